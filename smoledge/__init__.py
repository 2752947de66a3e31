"""smoledge: SmolVLM / SmolVLM2 on phones and edge boxes, with a cloud fallback.

The code lives in sibling folders of the repository (``export/``, ``quantize/``, ``runtime/``,
``cloud_fallback/``, ``benchmarks/``), installed as sub-packages of this one namespace.
"""

__version__ = "0.1.0"
