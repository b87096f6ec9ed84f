"""Where weights are found: explicit path, env vars, ComfyUI folders; and the not-found message."""

import logging

import pytest

from g4seg_core.errors import G4SegError, ModelNotFoundError
from g4seg_core.loading.model_files import find_checkpoint, find_clip_vision


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("G4SEG_CHECKPOINT", "G4SEG_CLIP", "COMFYUI_PATH"):
        monkeypatch.delenv(name, raising=False)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _comfy(tmp_path, checkpoints=(), clip=(), diffusers=()):
    root = tmp_path / "ComfyUI"
    for name in checkpoints:
        _touch(root / "models" / "checkpoints" / name)
    for name in clip:
        _touch(root / "models" / "clip_vision" / name)
    for name in diffusers:
        _touch(root / "models" / "diffusers" / name / "model_index.json")
    (root / "models").mkdir(parents=True, exist_ok=True)
    return root


def test_explicit_then_env_then_comfyui(tmp_path, monkeypatch):
    explicit = _touch(tmp_path / "mine.safetensors")
    env = _touch(tmp_path / "env.safetensors")
    root = _comfy(tmp_path, checkpoints=["v1-5-pruned-emaonly.safetensors"])
    monkeypatch.setenv("G4SEG_CHECKPOINT", str(env))
    monkeypatch.setenv("COMFYUI_PATH", str(root))
    assert find_checkpoint(explicit, root) == explicit
    assert find_checkpoint(None, root) == env
    monkeypatch.delenv("G4SEG_CHECKPOINT")
    assert find_checkpoint() == root / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors"


def test_checkpoint_preference_is_deterministic(tmp_path, caplog):
    names = ["zz_model.safetensors", "sd_xl_base_1.0.safetensors", "flux1-dev.safetensors",
             "v1-5-pruned-emaonly.safetensors", "sub/v2-1_512-ema-pruned.safetensors", "notes.txt"]
    root = _comfy(tmp_path, checkpoints=names)
    with caplog.at_level(logging.INFO, logger="g4seg"):
        found = find_checkpoint(comfyui_dir=root)
    assert found.name == "v2-1_512-ema-pruned.safetensors"  # SD2.1 first (the paper's model), subfolders searched
    assert "v2-1_512-ema-pruned" in caplog.text and "of 5 found" in caplog.text
    (found).unlink()
    assert find_checkpoint(comfyui_dir=root).name == "v1-5-pruned-emaonly.safetensors"


def test_diffusers_folders_are_found(tmp_path):
    root = _comfy(tmp_path, diffusers=["stable-diffusion-2-1-base", "b-model"])
    _touch(root / "models" / "diffusers" / "not-a-model" / "readme.md")
    assert find_checkpoint(comfyui_dir=root).name == "stable-diffusion-2-1-base"


def test_not_found_message_lists_everything(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError) as info:
        find_checkpoint()
    message = str(info.value)
    for needle in ("--checkpoint", "G4SEG_CHECKPOINT", "COMFYUI_PATH", "--comfyui-dir"):
        assert needle in message
    root = _comfy(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        find_checkpoint(comfyui_dir=root)
    message = str(info.value)
    assert str(root / "models" / "checkpoints") in message and str(root / "models" / "diffusers") in message
    assert isinstance(info.value, G4SegError) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError) as info:
        find_clip_vision(comfyui_dir=root)
    message = str(info.value)
    assert str(root / "models" / "clip_vision") in message and "--clip" in message and "G4SEG_CLIP" in message


def test_missing_explicit_paths(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        find_checkpoint(tmp_path / "nope.safetensors")
    monkeypatch.setenv("G4SEG_CHECKPOINT", str(tmp_path / "gone.safetensors"))
    with pytest.raises(ModelNotFoundError, match="G4SEG_CHECKPOINT"):
        find_checkpoint()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        find_clip_vision(f"ViT-B-16:{tmp_path / 'nope.bin'}")


def test_clip_vision_order(tmp_path, monkeypatch):
    root = _comfy(tmp_path, clip=["clip_vision_g.safetensors", "CLIP-ViT-H-14-laion2B.safetensors",
                                  "clip-vit-large-patch14.safetensors", "other.bin"])
    assert find_clip_vision(comfyui_dir=root).name == "clip-vit-large-patch14.safetensors"
    _touch(root / "models" / "clip_vision" / "ViT-B-16.bin")
    assert find_clip_vision(comfyui_dir=root).name == "ViT-B-16.bin"
    weights = _touch(tmp_path / "w.bin")
    assert find_clip_vision(f"ViT-B-16:{weights}") == f"ViT-B-16:{weights}"
    monkeypatch.setenv("G4SEG_CLIP", str(weights))
    assert find_clip_vision(comfyui_dir=root) == weights
    assert find_clip_vision(weights, comfyui_dir=root) == weights


def test_extra_model_paths_yaml_folders_are_searched(tmp_path):
    root = _comfy(tmp_path, checkpoints=["v1-5-pruned-emaonly.safetensors"])
    a1111 = tmp_path / "webui"
    sd21 = _touch(a1111 / "models" / "Stable-diffusion" / "v2-1_512-ema-pruned.safetensors")
    vit_h = _touch(tmp_path / "shared" / "encoders" / "clip_vision_h.safetensors")
    (root / "extra_model_paths.yaml").write_text(
        "a111:\n"
        "    base_path: ../webui/\n"            # relative to the yaml's folder
        "    checkpoints: models/Stable-diffusion\n"
        "shared:\n"
        f"    base_path: {tmp_path / 'shared'}\n"
        "    is_default: true\n"
        "    clip_vision: |\n"
        "        missing_folder/\n"
        "        encoders/  # where the big ones live\n")
    # SD2.1 (the paper's model) wins over ComfyUI's own SD1.5 file; the extra clip_vision folder is used
    assert find_checkpoint(comfyui_dir=root).resolve() == sd21.resolve()
    assert find_clip_vision(comfyui_dir=root).resolve() == vit_h.resolve()


def test_extra_model_paths_listed_when_nothing_found_and_bad_yaml_named(tmp_path):
    root = _comfy(tmp_path)
    (root / "extra_model_paths.yaml").write_text("other:\n    base_path: /nonexistent/ui\n    clip_vision: cv\n")
    with pytest.raises(ModelNotFoundError) as info:
        find_clip_vision(comfyui_dir=root)
    assert "/nonexistent/ui/cv" in str(info.value) and "folder missing" in str(info.value)
    (root / "extra_model_paths.yaml").write_text("a111:\n  base_path: [unclosed\n")
    with pytest.raises(ModelNotFoundError, match="extra_model_paths.yaml"):
        find_checkpoint(comfyui_dir=root)
