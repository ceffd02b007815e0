"""Loading: devices and dtypes, source checks and their messages, the fp32 output projection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_helper import loading
from diffusers_helper.loading import Components, SharedComponents, SourceError
from diffusers_helper.settings import ModelSources, SettingsError

REPO_ROOT = Path(__file__).resolve().parents[1]
ABSENT_REPO = "framepack-tests/no-such-repo-4b1d"


def _copy(src: str | Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- devices and dtypes ----------------------------------------------------------------------


def test_importing_loading_does_not_touch_cuda():
    code = (
        "import torch\n"
        "def boom(*a, **k):\n"
        "    raise AssertionError('CUDA touched at import')\n"
        "torch.cuda.is_available = boom\n"
        "torch.cuda.init = boom\n"
        "torch.cuda._lazy_init = boom\n"
        "torch.cuda.device_count = boom\n"
        "import diffusers_helper.loading\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_resolve_device_auto_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_mps_available", lambda: False)
    assert loading.resolve_device("auto") == torch.device("cpu")
    assert loading.resolve_device() == torch.device("cpu")
    assert loading.resolve_device("CPU") == torch.device("cpu")


def test_resolve_device_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_mps_available", lambda: True)
    assert loading.resolve_device("auto") == torch.device("mps")


def test_resolve_device_cuda_without_cuda_is_a_settings_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingsError, match="CUDA is not available"):
        loading.resolve_device("cuda")
    with pytest.raises(SettingsError, match="CUDA is not available"):
        loading.resolve_device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_on_this_machine():
    with pytest.raises(SettingsError) as info:
        loading.resolve_device("cuda")
    assert isinstance(info.value, ValueError)


def test_resolve_device_rejects_absent_mps_and_unknown_names(monkeypatch):
    monkeypatch.setattr(loading, "_mps_available", lambda: False)
    with pytest.raises(SettingsError, match="MPS"):
        loading.resolve_device("mps")
    for bad in ("gpu0", "tpu", "cuda:x"):
        with pytest.raises(SettingsError):
            loading.resolve_device(bad)


def test_cpu_dtypes_are_fp32():
    dtypes = loading.component_dtypes("cpu")
    assert set(dtypes) == {"transformer", "text_encoder", "text_encoder_2", "image_encoder", "vae"}
    assert set(dtypes.values()) == {torch.float32}


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_dtypes(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    dtypes = loading.component_dtypes(torch.device("cuda"))
    assert dtypes.pop("transformer") == expected
    assert set(dtypes.values()) == {torch.float16}


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_mps_dtypes(monkeypatch, bf16, expected):
    monkeypatch.setattr(loading, "_mps_supports_bf16", lambda: bf16)
    dtypes = loading.component_dtypes("mps")
    assert dtypes.pop("transformer") == expected
    assert set(dtypes.values()) == {torch.float16}


# --- loading the tiny models -----------------------------------------------------------------


def test_load_components_on_cpu(tiny_sources):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import (CLIPTextModel, CLIPTokenizer, LlamaModel, PreTrainedTokenizerFast,
                              SiglipVisionModel)

    c = loading.load_components(tiny_sources, "f1", device="cpu")
    assert isinstance(c, Components) and isinstance(c.shared, SharedComponents)
    assert c.model == "f1" and c.device == torch.device("cpu")
    assert isinstance(c.transformer, HunyuanVideoFramepackTransformer3DModel)
    assert isinstance(c.text_encoder, LlamaModel)
    assert isinstance(c.text_encoder_2, CLIPTextModel)
    assert isinstance(c.tokenizer, PreTrainedTokenizerFast)
    assert isinstance(c.tokenizer_2, CLIPTokenizer)
    assert isinstance(c.vae, AutoencoderKLHunyuanVideo)
    assert isinstance(c.image_encoder, SiglipVisionModel)
    assert type(c.feature_extractor).__name__ in {"SiglipImageProcessorPil", "SiglipImageProcessor"}
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae", "image_encoder"):
        module = getattr(c, name)
        assert not module.training, name
        params = list(module.parameters())
        assert all(p.dtype == torch.float32 for p in params), name
        assert all(p.device.type == "cpu" for p in params), name
        assert not any(p.requires_grad for p in params), name
    # No fp32 hook is needed when everything already runs in fp32.
    assert not c.transformer.proj_out._forward_pre_hooks
    # The f1 transformer is the f1 folder's.
    on_disk = load_file(str(next(Path(tiny_sources.transformer("f1")).glob("*00001-of-*.safetensors"))))
    name, tensor = next(iter(on_disk.items()))
    torch.testing.assert_close(c.transformer.state_dict()[name], tensor.float())


def test_everything_goes_through_from_pretrained(tiny_sources, monkeypatch):
    import diffusers
    import transformers

    calls = []
    classes = [diffusers.AutoencoderKLHunyuanVideo, diffusers.HunyuanVideoFramepackTransformer3DModel,
               transformers.LlamaModel, transformers.CLIPTextModel, transformers.SiglipVisionModel,
               transformers.PreTrainedTokenizerFast, transformers.CLIPTokenizer, loading._image_processor_class()]
    for cls in classes:
        original = cls.from_pretrained.__func__

        def spy(klass, source, *args, _original=original, **kwargs):
            calls.append((klass.__name__, source, kwargs.get("subfolder"), kwargs.get("use_safetensors")))
            return _original(klass, source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    loading.load_components(tiny_sources, "framepack", device="cpu")
    subfolders = {(source, sub) for _, source, sub, _ in calls}
    h, s, t = tiny_sources.hunyuan, tiny_sources.siglip, tiny_sources.transformer("framepack")
    assert subfolders == {(h, "text_encoder"), (h, "text_encoder_2"), (h, "tokenizer"), (h, "tokenizer_2"),
                          (h, "vae"), (s, "feature_extractor"), (s, "image_encoder"), (t, None)}
    models = [c for c in calls if c[0] not in {"PreTrainedTokenizerFast", "TokenizersBackend", "CLIPTokenizer"}
              and "Processor" not in c[0]]
    assert len(models) == 5 and all(c[3] is True for c in models)


def test_transformer_with_official_class_name_loads(tiny_sources):
    config = json.loads((Path(tiny_sources.transformer("framepack")) / "config.json").read_text())
    assert config["_class_name"] == "HunyuanVideoTransformer3DModelPacked"
    transformer = loading.load_transformer(tiny_sources.transformer("framepack"), "cpu")
    assert transformer.config.has_image_proj and transformer.config.has_clean_x_embedder
    assert transformer.image_projection is not None and transformer.clean_x_embedder is not None


def test_bf16_transformer_keeps_proj_out_in_fp32(tiny_sources, transformer_inputs):
    transformer = loading.load_transformer(tiny_sources.transformer("framepack"), "cpu", dtype=torch.bfloat16)
    assert transformer.x_embedder.proj.weight.dtype == torch.bfloat16
    assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert transformer.proj_out.weight.dtype == torch.float32
    assert transformer.proj_out.bias.dtype == torch.float32
    assert type(transformer.proj_out) is torch.nn.Linear  # a hook, not a rewritten class
    assert len(transformer.proj_out._forward_pre_hooks) == 1

    seen = {}
    transformer.proj_out.register_forward_hook(lambda m, args, out: seen.update(input=args[0].dtype, output=out.dtype))
    with torch.no_grad():
        (out,) = transformer(**transformer_inputs(transformer, dtype=torch.bfloat16))
    assert seen == {"input": torch.float32, "output": torch.float32}
    assert out.dtype == torch.float32 and torch.isfinite(out).all()

    # Even after a whole-model cast the projection runs in fp32.
    transformer.to(torch.bfloat16)
    with torch.no_grad():
        (out,) = transformer(**transformer_inputs(transformer, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and transformer.proj_out.weight.dtype == torch.float32

    transformer.proj_out_fp32_hook.remove()
    assert not transformer.proj_out._forward_pre_hooks


# --- missing and broken sources --------------------------------------------------------------


def test_check_sources_accepts_the_tiny_models(tiny_sources):
    loading.check_sources(tiny_sources, "framepack")
    loading.check_sources(tiny_sources, "f1")
    loading.check_sources(tiny_sources)


def test_missing_subfolder(tiny_sources, tmp_path):
    hunyuan = _copy(tiny_sources.hunyuan, tmp_path / "hunyuan")
    shutil.rmtree(hunyuan / "vae")
    sources = ModelSources(hunyuan=str(hunyuan), siglip=tiny_sources.siglip, transformers=tiny_sources.transformers)
    with pytest.raises(SourceError) as info:
        loading.check_sources(sources, "framepack")
    message = str(info.value)
    assert str(hunyuan) in message and "vae/" in message and "--hunyuan" in message and "HF_HOME" in message
    assert len(info.value.missing) == 1


def test_missing_files_are_all_listed(tiny_sources, tmp_path):
    hunyuan = _copy(tiny_sources.hunyuan, tmp_path / "hunyuan")
    siglip = _copy(tiny_sources.siglip, tmp_path / "siglip")
    (hunyuan / "tokenizer_2" / "merges.txt").unlink()
    (hunyuan / "text_encoder" / "model.safetensors").unlink()
    (siglip / "feature_extractor" / "preprocessor_config.json").unlink()
    sources = ModelSources(hunyuan=str(hunyuan), siglip=str(siglip), transformers=tiny_sources.transformers)
    with pytest.raises(SourceError) as info:
        loading.load_components(sources, "framepack", device="cpu")
    message = str(info.value)
    assert "tokenizer_2/merges.txt" in message
    assert "text_encoder/model.safetensors or text_encoder/model.safetensors.index.json" in message
    assert "feature_extractor/preprocessor_config.json" in message
    assert str(hunyuan) in message and str(siglip) in message
    assert "--hunyuan" in message and "--siglip" in message
    assert len(info.value.missing) == 3


def test_missing_shard(tiny_sources, tmp_path):
    folder = _copy(tiny_sources.transformer("framepack"), tmp_path / "fp")
    (folder / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    sources = tiny_sources.with_transformer("framepack", str(folder))
    with pytest.raises(SourceError) as info:
        loading.check_sources(sources, "framepack")
    message = str(info.value)
    assert "transformer source" in message and str(folder) in message
    assert "diffusion_pytorch_model-00002-of-00003.safetensors" in message and "--transformer" in message
    with pytest.raises(SourceError):
        loading.load_transformer(str(folder), "cpu")
    # The other variant's source is not needed, so its absence does not matter.
    loading.check_sources(tiny_sources.with_transformer("f1", str(tmp_path / "nowhere")), "framepack")


def test_missing_local_folder(tiny_sources, tmp_path):
    sources = tiny_sources.with_transformer("f1", str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="no such folder"):
        loading.check_sources(sources, "f1")


def _rewrite_tensor(folder: Path, name: str, new: torch.Tensor | None) -> None:
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(str(shard))
    if new is None:
        del tensors[name]
    else:
        tensors[name] = new
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_wrong_shape_weights(tiny_sources, tmp_path):
    folder = _copy(tiny_sources.transformer("framepack"), tmp_path / "fp")
    _rewrite_tensor(folder, "proj_out.weight", torch.zeros(8, 8, dtype=torch.bfloat16))
    with pytest.raises(SourceError) as info:
        loading.load_transformer(str(folder), "cpu")
    assert str(folder) in str(info.value) and "proj_out.weight" in str(info.value)


def test_config_that_does_not_match_the_weights(tiny_sources, tmp_path):
    folder = _copy(tiny_sources.transformer("framepack"), tmp_path / "fp")
    config = json.loads((folder / "config.json").read_text())
    config["num_attention_heads"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="FramePack transformer"):
        loading.load_transformer(str(folder), "cpu")


def test_weight_missing_from_a_shard(tiny_sources, tmp_path):
    # The index still promises the tensor, so diffusers would leave it empty (on the meta device).
    folder = _copy(tiny_sources.transformer("framepack"), tmp_path / "fp")
    _rewrite_tensor(folder, "proj_out.weight", None)
    with pytest.raises(SourceError, match=r"missing.*proj_out\.weight"):
        loading.load_transformer(str(folder), "cpu")


def test_weight_missing_from_a_text_encoder(tiny_sources, tmp_path):
    hunyuan = _copy(tiny_sources.hunyuan, tmp_path / "hunyuan")
    path = hunyuan / "text_encoder_2" / "model.safetensors"
    tensors = load_file(str(path))
    victim = next(k for k in tensors if "final_layer_norm" in k)
    del tensors[victim]
    save_file(tensors, str(path), metadata={"format": "pt"})
    sources = ModelSources(hunyuan=str(hunyuan), siglip=tiny_sources.siglip, transformers=tiny_sources.transformers)
    with pytest.raises(SourceError, match="CLIP text encoder") as info:
        loading.load_shared(sources, "cpu")
    assert "final_layer_norm" in str(info.value)


def test_plain_hunyuan_transformer_is_rejected(tiny_sources, tmp_path):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    config = json.loads((Path(tiny_sources.transformer("framepack")) / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(has_image_proj=False, has_clean_x_embedder=False)
    HunyuanVideoFramepackTransformer3DModel(**config).save_pretrained(tmp_path / "plain")
    with pytest.raises(SourceError, match="not a FramePack transformer"):
        loading.load_transformer(str(tmp_path / "plain"), "cpu")


def test_unreachable_hub_id_offline(tiny_sources, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sources = tiny_sources.with_transformer("framepack", ABSENT_REPO)
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        loading.check_sources(sources, "framepack")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert ABSENT_REPO in message and "config.json" in message and "HF_HUB_OFFLINE" in message
    assert "--transformer" in message


def test_unreachable_hub_id_online(tiny_sources, monkeypatch):
    from huggingface_hub import HfApi, constants

    def unreachable(self, repo_id, **kwargs):
        assert kwargs.get("timeout") is not None and kwargs["timeout"] <= 30
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    sources = ModelSources(hunyuan=ABSENT_REPO, siglip=tiny_sources.siglip, transformers=tiny_sources.transformers)
    with pytest.raises(SourceError) as info:
        loading.check_sources(sources, "framepack")
    message = str(info.value)
    assert ABSENT_REPO in message and "could not be asked" in message and "--hunyuan" in message
    assert "text_encoder/config.json" in message and "vae/config.json" in message


def _fake_hub_cache(cache: Path, repo: str, folder: str) -> None:
    # The Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo_dir / "snapshots" / commit)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_hub_ids_load_from_the_local_cache_offline(tiny_sources, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny/hunyuan", tiny_sources.hunyuan)
    _fake_hub_cache(cache, "tiny/siglip", tiny_sources.siglip)
    _fake_hub_cache(cache, "tiny/framepack", tiny_sources.transformer("framepack"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sources = ModelSources(hunyuan="tiny/hunyuan", siglip="tiny/siglip", transformers={"framepack": "tiny/framepack"})
    loading.check_sources(sources, "framepack")
    c = loading.load_components(sources, "framepack", device="cpu")
    assert c.text_encoder.config.hidden_size == 40 and c.transformer.config.num_layers == 1

    # A shard missing from the cache is reported before anything loads.
    snapshot = next((cache / "models--tiny--framepack" / "snapshots").iterdir())
    (snapshot / "diffusion_pytorch_model-00003-of-00003.safetensors").unlink()
    with pytest.raises(SourceError, match="00003-of-00003"):
        loading.check_sources(sources, "framepack")


def test_unknown_model_variant(tiny_sources):
    with pytest.raises(SettingsError):
        loading.check_sources(tiny_sources, "f2")
    with pytest.raises(SettingsError):
        loading.load_components(tiny_sources, "f2", device="cpu")


def test_source_error_is_a_value_error():
    assert issubclass(SourceError, ValueError)
