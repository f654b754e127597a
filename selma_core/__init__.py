"""selma: SELMA's skill-specific LoRA experts for text-to-image models, learned from auto-generated
data and merged. This package is the method (config, skills, phases, models, merging, metrics,
storage and tracking interfaces); ``jobs`` decides what runs where."""

__version__ = "0.1.0"
