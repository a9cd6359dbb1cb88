"""Typed events -> ECS documents: the event contract of DESIGN.md lives here."""
from tracer.schema.community_id import community_id
from tracer.schema.ecs import ECS_VERSION, Document, EcsEncoder, format_human, format_timestamp, to_json

__all__ = ["ECS_VERSION", "Document", "EcsEncoder", "community_id", "format_human", "format_timestamp", "to_json"]
