"""A tile budget: answer a photo locally with fewer tiles instead of sending it to the cloud.

SmolVLM splits a photo into a grid of tiles after resizing its longest edge to ``longest_edge``; a smaller
``longest_edge`` gives a smaller grid (1 x 1 split tiles up to 4 x 4 for the usual 4 x tile size), and no
splitting leaves the global image alone (1 tile).  With ``--max-tiles auto`` (``PolicyConfig.max_tiles``)
a request that does not fit this device because of its tiles or its memory is measured again at each
smaller grid, largest first, and runs locally at the first one that fits; ``--max-tiles N`` also caps every
request at N tiles.  The route says so: ``[route: local - ...; answered locally with 5 tiles instead of 17]``.

The engine must offer ``image_config`` and ``with_image_config(cfg)`` (the runtime's Pipeline does); other
engines keep the plain decision.
"""

from __future__ import annotations

from dataclasses import replace

from smoledge.runtime.preprocess import ImageProcessorConfig

from .policy import Decision

_TILE_KINDS = {"tiles", "memory"}


def smaller_configs(cfg: ImageProcessorConfig):
    """Image settings with fewer tiles per image, most tiles first: grids of n x n at most, then no split."""
    if not cfg.do_image_splitting:
        return
    per_side = -(-cfg.longest_edge // cfg.tile_size)
    for n in range(per_side - 1, 0, -1):
        yield replace(cfg, longest_edge=n * cfg.tile_size)
    yield replace(cfg, do_image_splitting=False)


def plan_fewer_tiles(answer, shape, decision: Decision, health):
    """(engine view, its shape, its decision) with fewer tiles, or None to keep ``decision``."""
    budget = answer.policy.max_tiles
    engine = answer.engine
    cfg = getattr(engine, "image_config", None)
    if budget is None or cfg is None or not hasattr(engine, "with_image_config") or not shape.image_tiles:
        return None
    cap = None if budget == "auto" else int(budget)
    over_cap = cap is not None and shape.image_tiles > cap
    if not over_cap and (decision.route == "local" or not decision.kinds or not set(decision.kinds) <= _TILE_KINDS):
        return None
    for smaller in smaller_configs(cfg):
        view = engine.with_image_config(smaller)
        fewer = view.measure(answer.request)
        if cap is not None and fewer.image_tiles > cap:
            continue
        d = answer._decide(fewer, health, engine=view)
        if d.route == "local":
            why = f"--max-tiles {budget}" if over_cap else decision.reason
            reason = f"{why}; answered locally with {fewer.image_tiles} tiles instead of {shape.image_tiles} ({d.reason})"
            return view, fewer, replace(d, code="fewer-tiles", reason=reason)
    return None
