"""A `prefect deploy` build step: a deployment names its profile (or params.yaml), and this resolves it to
the whole configuration the deployment stores. The Prefect UI's run form shows, and sends back, every field
of the parameters it is given, so a deployment that stored only `{profile: paper}` would have its form fill
the other fields with the schema's generic defaults and override the profile; resolved, the untouched form
runs exactly the profile, and an edited field overrides just that field."""
from __future__ import annotations

from tasks.config import PipelineConfig, load_config


def resolve_config(profile: str) -> dict:
    """`profile`: a name in profiles/ or a params file. Returns {"config": <the validated config as JSON>}."""
    cfg = load_config(profile) if profile.endswith((".yaml", ".yml")) else PipelineConfig(profile=profile)
    return {"config": cfg.model_dump(mode="json")}
