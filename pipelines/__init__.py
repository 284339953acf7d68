"""Stage 3: pipelines and the main job."""
