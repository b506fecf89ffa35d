"""Paper-scale vision building blocks (issue 12; METHODS.md §7-8), on CPU with tiny fakes.

The models are tiny random CLIPs of the real architectures (open_clip's ``CLIP`` and
transformers' ``CLIPVisionModel`` with a few layers of width 32); the datasets are a few dozen
tiny images written in the real on-disk formats: torchvision's EuroSAT folders, MNIST idx files
and SUN397 with its partition files, and Hugging Face ``datasets`` copies saved with
``save_to_disk`` or as a hub snapshot's parquet files. Every image's colour encodes its label, so
a test can read the label back from the pixels. Nothing touches the network.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import by huggingface_hub / datasets: never the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lib.heads import head_module
from lib.paper import clip as C
from lib.paper import vision_data as V

from paper_fakes import TINY
from paper_fakes import colour as _colour
from paper_fakes import hf_vision as _hf_vision
from paper_fakes import hub_copy as _hub_copy
from paper_fakes import label_of as _label_of
from paper_fakes import save_image as _save_image
from paper_fakes import write_idx as _write_idx
from paper_fakes import write_published_folder as _write_published_folder

# one thread; no mirror and a private download folder (nothing written into data/downloads)
pytestmark = pytest.mark.usefixtures("one_thread", "private_downloads")

KNOWN_CLASSES = {"sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
                 "mnist": 10, "dtd": 47}
KNOWN_TEMPLATES = {"sun397": 2, "stanford_cars": 8, "resisc45": 18, "eurosat": 3, "svhn": 1, "gtsrb": 3, "mnist": 1,
                   "dtd": 8}  # METHODS.md §8 (FusionBench's counts)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return C.load_clip(config=TINY)


# ============================================================================ the task file
@pytest.mark.parametrize("task", sorted(KNOWN_CLASSES))
def test_task_file_has_the_known_classes_and_templates(task):
    spec = V.task_spec(task)
    assert len(spec.classes) == KNOWN_CLASSES[task] and len(set(spec.classes)) == len(spec.classes)
    assert len(spec.templates) == KNOWN_TEMPLATES[task]
    for source, settings in spec.sources.items():  # a per-source list of names covers every label
        if isinstance(settings.get("class_names"), list):
            assert len(settings["class_names"]) == KNOWN_CLASSES[task], source
    assert spec.prompts(0)[0] == spec.templates[0].format(c=spec.classes[0]) and "{c}" not in spec.prompts(0)[0]


def test_task_file_lists_exactly_the_eight_tasks_with_canonical_sizes():
    tasks = V.clip_tasks()
    assert tuple(tasks) == V.PAPER_VISION_TASKS
    assert tasks["sun397"].canonical == {"train": 19850, "test": 19850}
    assert tasks["mnist"].canonical == {"train": 60000, "test": 10000}
    assert all(t.validation_fraction == 0.1 for t in tasks.values())
    assert tasks["stanford_cars"].expert == "stanford-cars"  # FusionBench's spelling in the experts' names
    assert C.expert_repo("ViT-L-14", "stanford_cars") == "tanganke/clip-vit-large-patch14_stanford-cars"


# ============================================================================ zero-shot heads
def test_zero_shot_head_is_the_scaled_normalized_mean_of_normalized_prompt_embeddings(tiny):
    classes, templates = ["cat", "dog", "traffic light"], ["a photo of a {c}.", "a {c} in the wild.", "art of the {c}."]
    head = C.zero_shot_head(tiny.model, tiny.tokenizer, classes, templates)
    scale = tiny.model.logit_scale.exp().item()
    with torch.no_grad():
        expected = []
        for name in classes:
            embedded = tiny.model.encode_text(tiny.tokenizer([t.format(c=name) for t in templates]))
            mean = (embedded / embedded.norm(dim=-1, keepdim=True)).mean(0)
            expected.append(scale * mean / mean.norm())
    torch.testing.assert_close(head["weight"], torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(head["bias"], torch.zeros(3)) and float(head["normalize"]) == 1.0
    # the rows differ from the normalized mean of *raw* embeddings: the test tells the recipes apart
    raw = tiny.model.encode_text(tiny.tokenizer([t.format(c="cat") for t in templates])).detach().mean(0)
    assert not torch.allclose(head["weight"][0], scale * raw / raw.norm(), atol=1e-4)


def test_zero_shot_head_takes_a_given_logit_scale_and_a_tasks_prompts(tiny):
    head = C.zero_shot_head(tiny.model, tiny.tokenizer, ["0", "1"], ['a photo of the number: "{c}".'], logit_scale=100)
    torch.testing.assert_close(head["weight"].norm(dim=1), torch.full((2,), 100.0))
    mnist = C.task_zero_shot_head(tiny, "mnist")
    assert mnist["weight"].shape == (10, TINY["embed_dim"])
    # the task's head is built from the task file's prompts: class 3's row is "the number: "3""
    three = C.zero_shot_head(tiny.model, tiny.tokenizer, ["3"], V.task_spec("mnist").templates)
    torch.testing.assert_close(mnist["weight"][3], three["weight"][0])


def test_image_encoder_with_its_head_computes_clip_logits(tiny):
    encoder = C.image_encoder(tiny.model)
    assert encoder.feature_dim == TINY["embed_dim"] and encoder.image_size == 32
    assert all(k.startswith("visual.") for k in encoder.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        features = encoder(pixel_values=x)  # how the project's encode() calls an encoder
        torch.testing.assert_close(features, tiny.model.encode_image(x))
        head = C.zero_shot_head(tiny.model, tiny.tokenizer, ["a", "b", "c"], ["{c}."])
        logits = head_module(head)(features)
        scale = float(tiny.model.logit_scale.exp())
        cosine = F.normalize(features, dim=-1) @ F.normalize(head["weight"], dim=-1).T
    torch.testing.assert_close(logits, scale * cosine, rtol=1e-5, atol=1e-5)


# ============================================================================ transformers -> open_clip
@pytest.mark.parametrize("prefix", ["vision_model.", ""], ids=["transformers-4 keys", "transformers-5 keys"])
def test_conversion_preserves_image_features(tiny, prefix):
    hf = _hf_vision(with_projection=True)
    state = {prefix + k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    encoder = C.image_encoder(tiny.model)
    encoder.visual.load_state_dict(C.hf_vision_to_open_clip(state), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values=x), hf(pixel_values=x).image_embeds, rtol=1e-5, atol=1e-5)


def test_a_model_without_projection_takes_the_given_one(tiny):
    hf = _hf_vision(with_projection=False)
    projection = torch.randn(TINY["vision_cfg"]["width"], TINY["embed_dim"])
    converted = C.hf_vision_to_open_clip(hf.state_dict(), projection=projection)
    encoder = C.image_encoder(tiny.model)
    encoder.visual.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values=x), hf(pixel_values=x).pooler_output @ projection,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="visual_projection.weight.*projection="):
        C.hf_vision_to_open_clip(hf.state_dict())
    with pytest.raises(KeyError, match="text_model.extra"):  # an unknown key is refused, not dropped
        C.hf_vision_to_open_clip({**hf.state_dict(), "text_model.extra": torch.zeros(1)}, projection=projection)


@pytest.mark.parametrize("files", ["safetensors", "sharded", "bin"])
def test_a_published_expert_folder_loads_with_the_same_outputs(tiny, tmp_path, files):
    hf = _hf_vision(with_projection=False, seed=2)
    models = tmp_path / "models"
    _write_published_folder(models / "tanganke" / "clip-vit-base-patch32_mnist", hf, files)
    base = C.image_encoder(tiny.model)
    expert = C.load_expert("ViT-B-32", "mnist", base, models_dir=models)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(expert(pixel_values=x), hf(pixel_values=x).pooler_output @ base.visual.proj,
                                   rtol=1e-5, atol=1e-5)
    assert not torch.equal(expert.visual.conv1.weight, base.visual.conv1.weight)  # base itself is untouched
    torch.testing.assert_close(expert.visual.proj, base.visual.proj)  # θ0's projection, shared by all experts


def test_an_expert_of_another_architecture_or_folder_is_a_clear_error(tiny, tmp_path):
    base = C.image_encoder(tiny.model)
    gelu = tmp_path / "gelu_expert"
    _write_published_folder(gelu, _hf_vision(with_projection=False, hidden_act="gelu"), "safetensors")
    with pytest.raises(ValueError, match=r"config.json.*hidden_act.*gelu"):
        C.load_hf_vision_encoder(gelu, base)
    with pytest.raises(FileNotFoundError, match=r"clip-vit-base-patch32_dtd.*huggingface-cli download"):
        C.load_expert("ViT-B-32", "dtd", base, models_dir=tmp_path / "models")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no model.safetensors"):
        C.read_hf_state_dict(tmp_path / "empty")


# ============================================================================ open_clip weights from a model folder
def test_load_clip_reads_open_clip_weights_from_the_model_folder(tiny, tmp_path):
    models = tmp_path / "models"
    folder = models / "timm" / "vit_base_patch32_clip_224.openai"  # open_clip's hub repository for the tag
    folder.mkdir(parents=True)
    # like open_clip's built-in ViT configs, the file does not ask for QuickGELU: load_clip must
    config = {k: v for k, v in TINY.items() if k != "quick_gelu"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    saved = {k: v.clone() + 0.01 for k, v in tiny.model.state_dict().items()}
    save_file(saved, folder / "open_clip_model.safetensors")
    loaded = C.load_clip("ViT-B-32", "openai", models_dir=models)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert C._activation(loaded.model.visual) == "quick_gelu"  # OpenAI's activation, whatever the config says
    with pytest.raises(FileNotFoundError, match=r"vit_base_patch16_clip_224.openai.*open_clip"):
        C.load_clip("ViT-B-16", "openai", models_dir=models)


# ============================================================================ datasets
def _assert_pixels_carry_labels(records: V.ImageRecords, labels=range(397)) -> None:
    assert len(records) > 0
    assert [_label_of(records.image(i), labels) for i in range(len(records))] == records.labels.tolist()


def test_eurosat_in_torchvisions_folders(tmp_path):
    classes = V.task_spec("eurosat").sources["torchvision"]["class_names"]
    root = tmp_path / "data" / "vision_paper" / "torchvision" / "eurosat" / "2750"
    for label, name in enumerate(classes):
        for k in range(10):
            _save_image(root / name / f"{name}_{k}.jpg", 20 * label, size=(8 + k, 8), fmt="PNG")  # lossless
    task = V.load_paper_vision_task("eurosat", data_dir=tmp_path / "data", source="torchvision", seed=0)
    assert task.source == "torchvision" and task.num_classes == 10 and task.classes[0] == "annual crop land"
    # 100 images: test = a fixed-seed 10% of each class, validation = 10% of the rest of each class
    assert (len(task.train), len(task.validation), len(task.test)) == (80, 10, 10)
    for split in (task.train, task.validation, task.test):
        assert [_label_of(split.image(i), [20 * y for y in range(10)]) // 20 for i in range(len(split))] \
            == split.labels.tolist()
    assert any("differ from the canonical 21,600 / 2,700" in n for n in task.notes)
    other = V.load_paper_vision_task("eurosat", data_dir=tmp_path / "data", source="torchvision", seed=1)
    assert np.array_equal(other.test.rows, task.test.rows)  # the test split never moves
    assert not np.array_equal(other.validation.rows, task.validation.rows)  # validation follows the seed


def test_clip_transform_resizes_crops_and_normalizes_like_clip(tmp_path):
    records = V.ImageRecords(V._FileImages([tmp_path / "a.png"]), np.array([0]), np.array([0]))
    _save_image(tmp_path / "a.png", 100, size=(40, 24), fmt="PNG")
    pixels = records.pixels([0], V.clip_transform(32))
    assert pixels.shape == (1, 3, 32, 32)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = (torch.tensor(_colour(100), dtype=torch.float) / 255 - mean) / std
    torch.testing.assert_close(pixels[0].mean(dim=(1, 2)), expected, atol=0.02, rtol=0)


def test_mnist_from_torchvisions_idx_files(tmp_path):
    raw = tmp_path / "data" / "vision_paper" / "torchvision" / "MNIST" / "raw"
    for prefix, n in (("train", 60), ("t10k", 10)):
        labels = np.arange(n) % 10
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.stack([np.full((28, 28), 25 * y) for y in labels]))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    task = V.load_paper_vision_task("mnist", data_dir=tmp_path / "data")  # the default source: torchvision
    assert task.source == "torchvision"
    assert (len(task.train), len(task.validation), len(task.test)) == (50, 10, 10)
    for split in (task.train, task.validation, task.test):
        grey = [int(np.asarray(split.image(i))[0, 0, 0]) for i in range(len(split))]
        assert grey == (25 * split.labels).tolist()  # and the image comes back as RGB
    assert task.test.labels.tolist() == list(range(10))  # the official test split, in file order


def test_sun397_uses_its_partition_files(tmp_path):
    spec = V.task_spec("sun397")
    data = tmp_path / "data" / "vision_paper" / "torchvision" / "SUN397"
    # ClassName.txt in SUN397's own format: /<first letter>/<name with underscores>
    folders = [f"/{name[0]}/{name.replace(' ', '_')}" for name in spec.classes]
    data.mkdir(parents=True)
    (data / "ClassName.txt").write_text("\n".join(folders) + "\n")
    chosen = [0, 1, 396]  # abbey, airplane cabin, youth hostel
    training, testing = [], []
    for label in chosen:
        for k in range(9):
            relative = f"{folders[label]}/sun_{label}_{k}.jpg"
            _save_image(data / relative.strip("/"), label, fmt="PNG")
            (training if k < 6 else testing if k < 8 else []).append(relative)  # image 8 is in neither list
    (data / "Training_01.txt").write_text("\n".join(training) + "\n")
    (data / "Testing_01.txt").write_text("\n".join(testing) + "\n")
    task = V.load_paper_vision_task("sun397", data_dir=tmp_path / "data")
    assert (len(task.train), len(task.validation), len(task.test)) == (15, 3, 6)
    assert sorted(set(task.test.labels.tolist())) == chosen
    for split in (task.train, task.validation, task.test):
        _assert_pixels_carry_labels(split)


def test_resisc45_from_a_saved_hub_copy(tmp_path):
    names = [c.replace(" ", "_") for c in V.task_spec("resisc45").classes]  # the hub spells them with underscores
    _hub_copy(names, {"train": 5, "test": 1}).save_to_disk(str(tmp_path / "data" / "vision_paper" / "huggingface" / "resisc45"))
    task = V.load_paper_vision_task("resisc45", data_dir=tmp_path / "data")
    assert task.source == "huggingface" and task.num_classes == 45
    assert (len(task.train), len(task.validation), len(task.test)) == (180, 45, 45)
    for split in (task.train, task.validation, task.test):
        assert [_label_of(split.image(i), range(0, 225, 5)) // 5 for i in range(len(split))] == split.labels.tolist()
    assert any("differ from the canonical 18,900 / 6,300" in n for n in task.notes)


def test_a_hub_snapshots_parquet_files_are_read(tmp_path):
    folder = tmp_path / "data" / "vision_paper" / "huggingface" / "eurosat" / "data"
    copy = _hub_copy(V.task_spec("eurosat").classes, {"train": 3, "test": 2, "contrast": 1})
    folder.mkdir(parents=True)
    for split, dataset in copy.items():  # the hub's layout: data/<split>-00000-of-00001.parquet
        dataset.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    task = V.load_paper_vision_task("eurosat", data_dir=tmp_path / "data")  # the default source: the hub copy
    assert len(task.train) + len(task.validation) == 30 and len(task.test) == 20  # "contrast" is not read
    for split in (task.train, task.validation, task.test):
        assert [_label_of(split.image(i), range(0, 50, 5)) // 5 for i in range(len(split))] == split.labels.tolist()


def test_a_source_with_another_class_order_is_refused(tmp_path):
    names = list(V.task_spec("eurosat").classes)
    names[3], names[4] = names[4], names[3]
    _hub_copy(names, {"train": 2, "test": 1}).save_to_disk(str(tmp_path / "data" / "vision_paper" / "huggingface" / "eurosat"))
    with pytest.raises(ValueError, match=r"label 3 is 'industrial buildings.*' in the source but 'highway or road'"):
        V.load_paper_vision_task("eurosat", data_dir=tmp_path / "data")


@pytest.mark.parametrize("task, source, says", [
    ("mnist", "torchvision", r"vision_paper/torchvision/MNIST/raw not found.*source='huggingface'.*unset DATA_DIR"),
    ("sun397", "torchvision", r"vision_paper/torchvision/SUN397/ClassName.txt not found"),
    ("resisc45", "huggingface", r"vision_paper/huggingface/resisc45 not found.*tanganke/resisc45.*save_to_disk"),
    ("svhn", "huggingface", r"vision_paper/huggingface/svhn not found.*ufldl-stanford/svhn \(cropped_digits\)"),
])
def test_a_mirror_without_the_files_is_a_clear_error(tmp_path, task, source, says):
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=says):
        V.load_paper_vision_task(task, data_dir=tmp_path / "data", source=source)


def test_a_source_the_task_does_not_have_is_refused(tmp_path):
    with pytest.raises(ValueError, match="resisc45 cannot be read from 'torchvision'"):
        V.load_paper_vision_task("resisc45", data_dir=tmp_path, source="torchvision")
