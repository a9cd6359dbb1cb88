"""Typed events -> ECS documents: the event contract of DESIGN.md lives here.

Importing the package loads only tracer.schema.document (Document, the versions): the encoders load on
first use of their names (a run client through the daemon writes documents without them). Community ID:
tracer.schema.community_id."""
from tracer.schema.document import ECS_VERSION, OCSF_VERSION, Document

__all__ = ["ECS_VERSION", "OCSF_VERSION", "Document", "EcsEncoder", "format_human", "format_timestamp", "to_json"]
_LAZY = {"EcsEncoder": "ecs", "format_human": "ecs", "format_timestamp": "ecs", "to_json": "ecs"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tracer.schema' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"tracer.schema.{module}"), name)
    globals()[name] = value
    return value
