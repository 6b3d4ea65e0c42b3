"""The SAE module: shapes, decoder constraint, folding, and safe save/load."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from raysae.core.config import SAEConfig
from raysae.core.sae import SAE, SAELoadError


def _sae(seed=0):
    return SAE(SAEConfig(d_in=6, d_sae=10), seed=seed)


def test_forward_matches_the_formula():
    sae = _sae()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(4, 6)
    x_hat, f = sae(x)
    f_ref = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.allclose(f, f_ref)
    assert torch.allclose(x_hat, f_ref @ sae.W_dec + sae.b_dec)
    assert (f >= 0).all() and f.shape == (4, 10)


def test_decoder_rows_unit_norm_and_parallel_grad_removed():
    sae = _sae()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10))
    x = torch.randn(32, 6)
    x_hat, _ = sae(x)
    (x_hat - x).pow(2).sum().backward()
    sae.remove_parallel_grad_()
    along = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert along.abs().max() < 1e-6 * sae.W_dec.grad.norm(dim=1).max()  # float32 roundoff
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10), atol=1e-6)


def test_folding_the_input_scale_keeps_features_and_reconstruction():
    sae = _sae()
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(8, 6) * 7
    scale = 0.3
    x_hat_scaled, f_scaled = sae(x * scale)
    sae.fold_input_scale_(scale)
    x_hat, f = sae(x)
    assert torch.allclose(f, f_scaled, atol=1e-5)
    assert torch.allclose(x_hat, x_hat_scaled / scale, atol=1e-4)


def test_save_load_round_trip_in_saelens_layout(tmp_path):
    sae = _sae(seed=3)
    path = sae.save(tmp_path / "sae", metadata={"hook_name": "blocks.3.hook_resid_post"},
                    raysae={"penalty": {"name": "power", "params": {"p": 0.5, "eps": 0.0}}})
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["d_in"] == 6 and cfg["d_sae"] == 10
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    tensors = load_file(str(path / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (6, 10) and tensors["W_dec"].shape == (10, 6)
    loaded = SAE.load(path)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    sae.save(path)  # overwrite in place is atomic and leaves no temp dirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_truncated_weights_are_refused(tmp_path):
    path = _sae().save(tmp_path / "sae")
    weights = path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SAELoadError, match="unreadable"):
        SAE.load(path)


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_payload_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _sae().save(tmp_path / "sae")
    (path / "sae_weights.safetensors").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(SAELoadError):
        SAE.load(path)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_or_mismatched_config_is_refused(tmp_path):
    path = _sae().save(tmp_path / "sae")
    cfg_file = path / "cfg.json"
    text = cfg_file.read_text()
    cfg_file.write_text(text[: len(text) // 2])
    with pytest.raises(SAELoadError, match="not valid JSON"):
        SAE.load(path)
    cfg = json.loads(text)
    cfg["d_sae"] = 11
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(SAELoadError, match="W_enc has shape"):
        SAE.load(path)
    with pytest.raises(SAELoadError, match="no cfg.json"):
        SAE.load(tmp_path)


def test_topk_and_jumprelu_round_trip_under_saelens_names(tmp_path):
    topk = SAE(SAEConfig(d_in=6, d_sae=10), seed=1, architecture="topk", k=3)
    x = torch.randn(16, 6)
    assert ((topk.encode(x) > 0).sum(-1) <= 3).all()
    cfg = json.loads((topk.save(tmp_path / "t") / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3
    assert torch.equal(SAE.load(tmp_path / "t").encode(x), topk.encode(x))
    theta = torch.linspace(0.0, 0.5, 10)
    jump = SAE(SAEConfig(d_in=6, d_sae=10), seed=1, architecture="jumprelu", threshold=theta)
    jump.save(tmp_path / "j")
    assert torch.equal(load_file(str(tmp_path / "j" / "sae_weights.safetensors"))["threshold"],
                       theta)
    loaded = SAE.load(tmp_path / "j")
    assert loaded.architecture == "jumprelu" and torch.equal(loaded.encode(x), jump.encode(x))
    pre = (x - jump.b_dec) @ jump.W_enc + jump.b_enc
    assert torch.equal(jump.encode(x), torch.where(pre > theta, pre.clamp_min(0), 0.0))


def test_bad_architecture_fields_are_refused(tmp_path):
    with pytest.raises(ValueError, match="integer k"):
        SAE(SAEConfig(d_in=6, d_sae=10), architecture="topk", k=11)
    path = SAE(SAEConfig(d_in=6, d_sae=10), architecture="topk", k=2).save(tmp_path / "t")
    cfg = json.loads((path / "cfg.json").read_text())
    for bad in ({"k": 0}, {"k": 11}, {"architecture": "no_such_architecture"}):
        (path / "cfg.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(SAELoadError):
            SAE.load(path)
    (path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SAELoadError, match="threshold"):
        SAE.load(path)  # a jumprelu config without its threshold tensor
