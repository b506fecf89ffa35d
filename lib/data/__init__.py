"""The data layer: text and image classification tasks with seeded, documented splits.

- ``load_text_task(name)``: SentEval and TweetEval tasks (``TEXT_TASKS``) or a user's files.
- ``load_vision_task(name)``: MNIST, Fashion-MNIST, USPS, GTSRB, CIFAR-10, EuroSAT, KMNIST,
  MNIST-M (``VISION_TASKS``) or a user's folder of images; ``prepare_images`` makes network
  inputs of them.
- A user's task may carry a ``task.yaml`` (name, class names, metric, carved split sizes):
  ``lib.data.task_description``. User files are parsed strictly: every problem is an error
  that names the file (and line) and the fix; every default and ignored file is in the notes.
- ``subsample(split, n, seed)``: a class-stratified, seeded cap on a split's size.

Data comes from the offline mirror named by ``DATA_DIR`` or, without one, is downloaded once
into ``data/downloads``. See ``data/README.md`` for every split's size and each quirk.
"""
from .splits import stratified_split, subsample, subsample_indices
from .task_description import TaskDescription, find_task_description, read_task_description
from .text import TEXT_TASKS, TextSplit, TextTask, load_text_task
from .vision import VISION_TASKS, ImageSplit, VisionTask, load_vision_task, prepare_images

__all__ = [
    "TEXT_TASKS",
    "VISION_TASKS",
    "ImageSplit",
    "TaskDescription",
    "TextSplit",
    "TextTask",
    "VisionTask",
    "find_task_description",
    "load_text_task",
    "load_vision_task",
    "prepare_images",
    "read_task_description",
    "stratified_split",
    "subsample",
    "subsample_indices",
]
