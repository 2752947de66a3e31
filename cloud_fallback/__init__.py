"""Route a request between the device and Hugging Face Inference Providers.

Public API::

    answer(request, engine, config=...) -> Answer     # stream of StreamChunk, .decision = route + reason
    answer_text(request, engine, config=...) -> Reply
    format_decision(decision) -> str                  # "[route: cloud - 17 tiles > 5 allowed on ...]"
    add_routing_arguments(parser)                     # --profile --no-cloud --deadline --project
    router_config(profile=, no_cloud=, deadline=, project=, env=) -> RouterConfig   # from Python
    router_config_from_args(args, env=None) -> RouterConfig                         # from the CLI's flags
    LocalEngine                                       # the protocol the local engine satisfies
    HealthTracker(policy)                             # local health that recovers, shared by a server's threads
    decide(shape, manifest, profile, health, policy) -> Decision   # the pure routing policy

Nothing heavy is imported here: the HTTP library is loaded on the first cloud call.
"""

from .answer import Answer, Reply, answer, answer_text, format_decision
from .cloud import CloudFallback, cloud_targets
from .config import (
    CloudConfig,
    CooldownConfig,
    LedgerConfig,
    PolicyConfig,
    RetryConfig,
    RouterConfig,
    UploadConfig,
    add_routing_arguments,
    router_config,
    router_config_from_args,
)
from .engine import LocalEngine
from .health import HealthTracker
from .ledger import Ledger
from .policy import Decision, LocalHealth, decide
from .profiles import DeviceProfile, SpeedFigures, load_profile, profile_names
from .spend import SpendCap

__all__ = [
    "Answer", "Reply", "answer", "answer_text", "format_decision", "CloudFallback", "cloud_targets",
    "CloudConfig", "CooldownConfig", "LedgerConfig", "PolicyConfig", "RetryConfig", "RouterConfig", "UploadConfig",
    "HealthTracker", "SpendCap",
    "add_routing_arguments", "router_config", "router_config_from_args", "LocalEngine", "Ledger", "Decision", "LocalHealth",
    "decide", "DeviceProfile", "SpeedFigures", "load_profile", "profile_names",
]
