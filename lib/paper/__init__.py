"""Paper scale (issue 12; METHODS.md §7-8): the models and data of the merging papers' own
benchmarks, beside the small-scale tracks of ``lib.experiments.tracks``.

- ``lib.paper.clip``: CLIP ViT-B/32, B/16, L/14 image encoders from open_clip (OpenAI weights),
  zero-shot heads from the text tower, and the published fine-tuned experts (transformers
  ``CLIPVisionModel`` files) converted to open_clip's keys.
- ``lib.paper.vision_data``: the eight vision tasks (SUN397, Stanford Cars, RESISC45, EuroSAT,
  SVHN, GTSRB, MNIST, DTD) read through torchvision or Hugging Face ``datasets``, with their
  class names and prompt templates from ``data/clip_tasks.yaml``.
- ``lib.paper.glue``: RoBERTa-base on eight GLUE tasks (``data/glue_tasks.yaml``): readers,
  RoBERTa's pair encoding, official metrics, the per-task classification head (never merged),
  published experts split into encoder and head, and DARE's fine-tuning recipe.

Heavy libraries (open_clip, torchvision, datasets, transformers) are imported by the functions
that need them, so importing this package is cheap.
"""
from .clip import (CLIP_ARCHS, CLIPBundle, CLIPImageEncoder, expert_repo, hf_vision_to_open_clip, hub_folder,
                   image_encoder, load_clip, load_expert, load_hf_vision_encoder, models_mirror, read_hf_state_dict,
                   task_zero_shot_head, zero_shot_head)
from .glue import (PAPER_TEXT_TASKS, GlueFinetuneRecipe, PaperTextTask, RobertaEncoder, SequenceClassificationHead,
                   glue_scores, glue_task_spec, glue_tasks, load_glue_expert, load_glue_task, load_roberta)
from .vision_data import (PAPER_VISION_TASKS, ImageRecords, PaperVisionTask, TaskSpec, clip_tasks, clip_transform,
                          load_paper_vision_task, mirror_layout, task_spec)

__all__ = [
    "PAPER_TEXT_TASKS", "GlueFinetuneRecipe", "PaperTextTask", "RobertaEncoder", "SequenceClassificationHead",
    "glue_scores", "glue_task_spec", "glue_tasks", "load_glue_expert", "load_glue_task", "load_roberta",
    "CLIP_ARCHS", "CLIPBundle", "CLIPImageEncoder", "PAPER_VISION_TASKS", "ImageRecords", "PaperVisionTask",
    "TaskSpec", "clip_tasks", "clip_transform", "expert_repo", "hf_vision_to_open_clip", "hub_folder",
    "image_encoder", "load_clip", "load_expert", "load_hf_vision_encoder", "load_paper_vision_task",
    "mirror_layout", "models_mirror", "read_hf_state_dict", "task_spec", "task_zero_shot_head", "zero_shot_head",
]
