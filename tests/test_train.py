"""Training objective and trainer on tiny random models and tiny synthetic shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model
from safetensors.torch import load_file

from tidar.cli.train import main as train_main
from tidar.masks import tidar_training_mask
from tidar.model.config import AdapterConfig
from tidar.model.weights import load_model
from tidar.train import trainer
from tidar.train.config import TrainConfig, check_config
from tidar.train.distributed import Dist, dist_from_env
from tidar.train.errors import TrainConfigError
from tidar.train.objectives import ar_loss, autocast, block_diffusion_loss, noise_generator, tidar_loss
from tidar.train.prepare import prepare
from tidar.train.trainer import lr_at

TINY = tiny_config()
SCRATCH = "scratch:" + json.dumps({k: getattr(TINY, k) for k in (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id")})
# metrics that depend on the clock, not on the computation
CLOCK = ("tokens_per_s", "elapsed_s")




def adapter_model(seed: int = 0) -> torch.nn.Module:
    """Tiny model + adapter with non-zero LoRA B (a fresh adapter is a no-op), base frozen."""
    m = tiny_model(seed)
    m.add_adapter(AdapterConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_b" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    trainable = set(map(id, m.adapter_parameters()))
    for p in m.parameters():
        p.requires_grad_(id(p) in trainable)
    return m


def cfg_for(tmp: Path, shards: Path, **kw) -> TrainConfig:
    base = dict(init=SCRATCH, mode="full", objective="tidar", data=str(shards), seq_len=16, batch_size=4,
                block_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=6, eval_every=3, eval_batches=2,
                save_every=0, out_dir=str(tmp / "run"), tokenizer=None, progress=False, threads=1)
    base.update(kw)
    return TrainConfig.from_dict(base)


def records(out_dir: str | Path) -> list[dict]:
    lines = Path(out_dir, "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in CLOCK} for ln in lines if ln.strip()]


# -- objective -------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_adapter", [False, True])
def test_mask_inputs_never_change_clean_logits(with_adapter: bool) -> None:
    m = adapter_model() if with_adapter else tiny_model()
    x = torch.randint(0, 97, (2, 16))
    attn, pos = tidar_training_mask(16, 4)
    masks = torch.full_like(x, m.config.mask_token_id)
    with torch.no_grad():
        ref = m(torch.cat([x, masks], 1), pos[None], attn[None, None])[:, :16]
        ar_ref = tidar_loss(m, x, 4)["ar_loss"]
        # other tokens in the mask half
        other = m(torch.cat([x, torch.randint(0, 97, (2, 16))], 1), pos[None], attn[None, None])[:, :16]
        m.mask_embed.add_(torch.randn_like(m.mask_embed))
        perturbed = m(torch.cat([x, masks], 1), pos[None], attn[None, None])[:, :16]
        ar_perturbed = tidar_loss(m, x, 4)["ar_loss"]
    assert torch.equal(ref, other) and torch.equal(ref, perturbed)
    assert torch.equal(ar_ref, ar_perturbed)


@pytest.mark.parametrize(("targets", "dtype"), [("data", "float32"), ("self", "float32"), ("self-kl", "float32"),
                                               ("data", "bfloat16")])
def test_cached_clean_path_matches_single_forward(targets: str, dtype: str) -> None:
    m = adapter_model()
    x = torch.randint(0, 97, (3, 16))
    outs, grads = [], []
    for cached in (False, True):
        with autocast(torch.device("cpu"), dtype):
            out = tidar_loss(m, x, 4, alpha=0.5, targets=targets, cached_clean=cached)
        out["loss"].backward()
        grads.append([p.grad.clone() for p in m.adapter_parameters()])
        m.zero_grad(set_to_none=True)
        outs.append(out)
    a, b = outs
    for k in ("loss", "ar_loss", "diff_loss", "acc_data", "acc_ar", "accept_est"):
        torch.testing.assert_close(a[k].detach(), b[k].detach(), atol=1e-5, rtol=0)
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


def test_tidar_loss_definition() -> None:
    """Hand-computed AR / diffusion / self-distillation losses from one 2L forward."""
    m = tiny_model()
    x = torch.randint(0, 97, (2, 8))
    attn, pos = tidar_training_mask(8, 4)
    with torch.no_grad():
        logits = m(torch.cat([x, torch.full_like(x, m.config.mask_token_id)], 1), pos[None], attn[None, None])
        clean, mask = logits[:, :8], logits[:, 8:]
        ar = F.cross_entropy(clean[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
        diff = F.cross_entropy(mask.reshape(-1, 97), x.reshape(-1))
        self_t = clean[:, :-1].argmax(-1)
        diff_self = F.cross_entropy(mask[:, 1:].reshape(-1, 97), self_t.reshape(-1))
        out = tidar_loss(m, x, 4, alpha=2.0)
        out_self = tidar_loss(m, x, 4, targets="self")
        kl = tidar_loss(m, x, 4, targets="self-kl")["diff_loss"]
    torch.testing.assert_close(out["ar_loss"], ar)
    torch.testing.assert_close(out["diff_loss"], diff)
    torch.testing.assert_close(out["loss"], (2 * ar + diff) / 3)
    torch.testing.assert_close(out_self["diff_loss"], diff_self)
    log_p, log_q = F.log_softmax(clean[:, :-1], -1), F.log_softmax(mask[:, 1:], -1)
    torch.testing.assert_close(kl, (log_p.exp() * (log_p - log_q)).sum(-1).mean())
    hit = (mask.argmax(-1) == x).float()
    torch.testing.assert_close(out["acc_data"], hit.view(2, 2, 4).mean((0, 1)))
    assert 1.0 <= float(out["accept_est"]) <= 4.0


def test_self_kl_gradient_is_the_kl_gradient() -> None:
    """The fused soft-target form trains exactly as the written-out KL(p_AR || q_diff) would."""
    m = adapter_model()
    x = torch.randint(0, 97, (2, 16))
    attn, pos = tidar_training_mask(16, 4)
    tidar_loss(m, x, 4, alpha=0.0, targets="self-kl")["loss"].backward(inputs=list(m.adapter_parameters()))
    fused = [p.grad.clone() for p in m.adapter_parameters()]
    m.zero_grad(set_to_none=True)
    logits = m(torch.cat([x, torch.full_like(x, m.config.mask_token_id)], 1), pos[None], attn[None, None])
    log_p = F.log_softmax(logits[:, :15].detach(), -1)
    log_q = F.log_softmax(logits[:, 17:], -1)
    (log_p.exp() * (log_p - log_q)).sum(-1).mean().backward(inputs=list(m.adapter_parameters()))
    assert any(g.abs().sum() > 0 for g in fused)
    for a, b in zip(fused, [p.grad for p in m.adapter_parameters()], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_adapter_ar_loss_equals_base_exactly() -> None:
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        base = tidar_loss(tiny_model(), x, 4)
        adapted = tidar_loss(adapter_model(), x, 4)
        base_ar = ar_loss(tiny_model(), x)
    assert torch.equal(base["ar_loss"], adapted["ar_loss"])
    assert torch.equal(base["ar_loss"], base_ar["ar_loss"])
    assert not torch.equal(base["diff_loss"], adapted["diff_loss"])  # the adapter does act on masks


def test_adapter_mode_gradients_reach_only_the_adapter() -> None:
    m = adapter_model()
    tidar_loss(m, torch.randint(0, 97, (2, 16)), 4)["loss"].backward()
    adapter = set(map(id, m.adapter_parameters()))
    for n, p in m.named_parameters():
        if id(p) in adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_block_diffusion_loss_is_deterministic_and_masks_only_noisy() -> None:
    m = tiny_model()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        a = block_diffusion_loss(m, x, 4, noise_generator(0, 5, 0))
        b = block_diffusion_loss(m, x, 4, noise_generator(0, 5, 0))
        full = block_diffusion_loss(m, x, 4, full_mask=True)
    assert torch.equal(a["loss"], b["loss"]) and full["acc_data"].shape == (4,)


@pytest.mark.parametrize("mode", ["full", "adapter"])
def test_overfits_one_batch(mode: str) -> None:
    torch.manual_seed(0)
    m = adapter_model() if mode == "adapter" else tiny_model()
    m.train()
    x = torch.randint(0, 97, (2, 16))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        out = tidar_loss(m, x, 4)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["diff_loss"] if mode == "adapter" else out["loss"].detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_lr_schedule() -> None:
    lrs = [lr_at(s, 1.0, 0.1, 4, 20) for s in range(21)]
    assert lrs[0] == 0.25 and lrs[3] == 1.0 and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert abs(lrs[20] - 0.1) < 1e-12


# -- trainer ---------------------------------------------------------------------------------------


def test_adapter_training_leaves_base_bitwise_unchanged(tmp_path: Path, shards: Path, base_dir: Path) -> None:
    cfg = cfg_for(tmp_path, shards, init=str(base_dir), mode="adapter", adapter_rank=4, adapter_alpha=8.0,
                  max_steps=4, eval_every=0, adapter_layers=[-1])
    res = trainer.train(cfg)
    assert res["train"]["step"] == 4
    before = load_model(base_dir).state_dict()
    after_model = load_model(Path(cfg.out_dir) / "model")  # adapter manifest -> base + adapter
    after = after_model.state_dict()
    for k, v in before.items():
        if k != "mask_embed":
            assert torch.equal(v, after[k]), k
    assert not torch.equal(before["mask_embed"], after["mask_embed"])
    lora_b = [v for k, v in after.items() if "lora_b" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert all("layers.1." in k for k in after if "lora_" in k)  # adapter_layers=[-1]


@pytest.mark.parametrize(("mode", "objective", "targets"), [
    ("full", "tidar", "data"), ("adapter", "tidar", "self"), ("full", "block_diffusion", "data"),
    ("full", "ar", "data")])
def test_resume_is_exact(tmp_path: Path, shards: Path, base_dir: Path, mode: str, objective: str,
                         targets: str) -> None:
    kw = dict(mode=mode, objective=objective, targets=targets, grad_accum=2)
    if mode == "adapter":
        kw.update(init=str(base_dir), adapter_rank=4, adapter_alpha=8.0)
    straight = cfg_for(tmp_path / "a", shards, **kw)
    trainer.train(straight)
    split = cfg_for(tmp_path / "b", shards, stop_after=3, **kw)
    first = trainer.train(split)
    assert first["step"] == 3 and (Path(split.out_dir) / "model").exists()  # the model so far
    split.stop_after = 0
    second = trainer.train(split, resume=True)  # a fresh model, optimizer and RNG, all from the checkpoint
    assert second["step"] == 6
    assert records(straight.out_dir) == records(split.out_dir)
    a = load_file(Path(straight.out_dir, "model", "adapter.safetensors" if mode == "adapter" else "model.safetensors"))
    b = load_file(Path(split.out_dir, "model", "adapter.safetensors" if mode == "adapter" else "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_rotated_and_resume_refuses_other_config(tmp_path: Path, shards: Path) -> None:
    cfg = cfg_for(tmp_path, shards, save_every=2, eval_every=0)
    trainer.train(cfg)
    out = Path(cfg.out_dir)
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000006"]
    assert (out / "latest").read_text().strip() == "ckpt-00000006"
    assert not list(out.glob(".*tmp*"))
    with pytest.raises(TrainConfigError, match="different config.*lr"):
        trainer.train(cfg_for(tmp_path, shards, save_every=2, eval_every=0, lr=1e-2))


def test_metrics_and_plot(tmp_path: Path, shards: Path) -> None:
    from tidar.cli.plot import main as plot_main
    from tidar.measure.plots import plot_metrics

    cfg = cfg_for(tmp_path, shards)
    trainer.train(cfg)
    recs = records(cfg.out_dir)
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for k in ("loss", "ar_loss", "diff_loss", "lr", "tokens"):
        assert k in train[0]
    for k in ("val_ar_loss", "val_ppl", "val_diff_loss", "val_acc_data", "val_acc_ar", "val_accept_est"):
        assert k in evals[-1]
    assert len(evals[-1]["val_acc_data"]) == 4
    png = plot_metrics([cfg.out_dir], tmp_path / "m.png")
    assert png.stat().st_size > 1000
    assert plot_main([cfg.out_dir, "--out", str(tmp_path / "n.png")]) == 0 and (tmp_path / "n.png").exists()


@pytest.mark.parametrize(("mode", "fsdp"), [("adapter", False), ("full", False), ("adapter", True)])
def test_ddp_two_processes_match_single_process(tmp_path: Path, shards: Path, base_dir: Path, mode: str,
                                                fsdp: bool) -> None:
    """2 gloo ranks x batch 2 == 1 process x batch 4 (batch_at slices the same global batch); DDP, and
    FSDP2 sharding on CPU."""
    kw = dict(mode=mode, max_steps=3, eval_every=0, lr=1e-3)
    if mode == "adapter":
        kw.update(init=str(base_dir), adapter_rank=4, adapter_alpha=8.0)
    weights = "adapter.safetensors" if mode == "adapter" else "model.safetensors"
    single = cfg_for(tmp_path / "single", shards, **kw)
    trainer.train(single)
    ddp_dir = tmp_path / "ddp" / "run"
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                 for k, v in {**cfg_for(tmp_path / "ddp", shards, **kw).to_dict(), "batch_size": 2, "fsdp": fsdp}.items()
                 if v is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(Path(trainer.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tidar.cli", "train", *overrides, "tokenizer=null"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(Path(single.out_dir, "model", weights))
    b = load_file(ddp_dir / "model" / weights)
    # One process sums the batch of 4 in another order than 2 ranks' all-reduced halves, and Adam's update
    # g / sqrt(v) magnifies that rounding where a gradient is tiny: up to 2.4e-6 after 3 steps measured on
    # 2026-12-06 (adapter mode, an Intel Xeon). A batch sliced wrongly moves weights by ~lr = 1e-3.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    ra = [r for r in records(single.out_dir) if r["kind"] == "train"]
    rb = [r for r in records(ddp_dir) if r["kind"] == "train"]
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5


# -- configuration errors --------------------------------------------------------------------------


def test_bad_configs_fail_at_start_with_clear_messages(tmp_path: Path, shards: Path, capsys) -> None:
    with pytest.raises(TrainConfigError, match="block_size \\(3\\) must divide seq_len \\(16\\)"):
        prepare(cfg_for(tmp_path, shards, block_size=3))
    with pytest.raises(TrainConfigError, match="data:.*index.json not found"):
        prepare(cfg_for(tmp_path, tmp_path / "nope"))
    with pytest.raises(TrainConfigError, match="unknown config key\\(s\\) lrr; valid keys: init, mode"):
        TrainConfig.from_dict({"lrr": 1})
    with pytest.raises(TrainConfigError, match="'lr': expected float"):
        TrainConfig.load(None, ["lr=fast"])
    with pytest.raises(TrainConfigError, match="trains nothing"):
        prepare(cfg_for(tmp_path, shards, mode="adapter", objective="ar"))
    with pytest.raises(TrainConfigError, match="fewer than seq_len"):
        prepare(cfg_for(tmp_path, shards, seq_len=4096, block_size=4))
    # several problems are reported together
    with pytest.raises(TrainConfigError, match="(?s)mode must be.*objective must be"):
        prepare(cfg_for(tmp_path, shards, mode="lora", objective="mdlm"))
    # the CLI: one line on stderr, exit status 2, nothing trained
    assert train_main([f"data={tmp_path / 'nope'}", f"out_dir={tmp_path / 'x'}"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid training setup")
    assert train_main(["--set", "bogus=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 1e-4, "adapter_layers": [1, 2], "max_steps": 1e3}))
    cfg = TrainConfig.load(path, ["lr=5e-4", "adapter_targets=[\"q_proj\"]", "init=smollm2", "fsdp=true"])
    assert cfg.lr == 5e-4 and cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert cfg.adapter_layers == [1, 2] and cfg.adapter_targets == ["q_proj"] and cfg.fsdp is True


@pytest.mark.parametrize("name", ["smollm2-adapter-b4.json", "tiny-ar.json", "tiny-tidar.json"])
def test_shipped_configs_parse(name: str) -> None:
    path = Path(__file__).parents[1] / "configs" / name
    cfg = TrainConfig.load(path)
    assert check_config(cfg) == []


def test_export_of_a_continued_run_records_the_lineage(tmp_path: Path, shards: Path, base_dir: Path) -> None:
    from tidar.train.export import export

    kw = dict(mode="adapter", adapter_rank=4, adapter_alpha=8.0, max_steps=2, eval_every=0, save_every=2)
    first = cfg_for(tmp_path / "a", shards, init=str(base_dir), **kw)
    trainer.train(first)
    shipped = tmp_path / "shipped"
    m1 = export(Path(first.out_dir), shipped, extra={"data": {"sources": ["corpus"]}})
    assert "lineage" not in m1 and m1["tokens"] == 2 * 4 * 16
    second = cfg_for(tmp_path / "b", shards, init=str(shipped), seed=1, **kw)
    trainer.train(second)
    # overwrites the adapter it was initialised from
    m2 = export(Path(second.out_dir), shipped, extra={"data": {"sources": ["generated"]}})
    assert [e["tokens"] for e in m2["lineage"]] == [m1["tokens"], m2["tokens"]]
    assert m2["lineage"][-1]["data"] == ["generated"] and m2["lineage"][0]["data"] == ["corpus"]
    assert m2["data"] == {"sources": ["generated"]}
    assert m2["tokens_total"] == 2 * m1["tokens"]
    # a datastore built into the shipped directory survives a re-export, with its record
    from tidar.decode import Datastore

    Datastore([[1, 2, 3]], vocab_size=97).save(shipped)
    (shipped / "tidar.json").write_text(json.dumps({**m2, "datastore": {"tokens": 3}}))
    m3 = export(Path(second.out_dir), shipped, {"block_size": 2})  # re-export, e.g. a new operating point
    assert m3["lineage"] == m2["lineage"] and m3["tokens_total"] == m2["tokens_total"]
    assert m3["datastore"] == {"tokens": 3} and Datastore.load(shipped).draft([1, 2], 1) == [3]
    assert load_model(shipped).has_adapter


def test_grown_adapter_computes_the_same_and_trains_from_a_narrower_one(tmp_path: Path, shards: Path,
                                                                        base_dir: Path) -> None:
    m = adapter_model()
    x = torch.randint(0, tiny_config().vocab_size - 1, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = tidar_loss(m, x, 4)
        m.grow_adapter(rank=12, alpha=6.0)  # another alpha/rank: B is rescaled
        after = tidar_loss(m, x, 4)
    assert m.config.adapter.rank == 12 and m.layers[0].self_attn.q_proj.lora_a.shape[0] == 12
    torch.testing.assert_close(after["diff_loss"], before["diff_loss"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rank <= 2"):
        m.grow_adapter(rank=2, alpha=4.0)
    # the trainer widens an adapter it is initialised from when only adapter_rank grows
    kw = dict(mode="adapter", adapter_alpha=8.0, max_steps=1, eval_every=0, save_every=1)
    trainer.train(cfg_for(tmp_path / "a", shards, init=str(base_dir), adapter_rank=4, **kw))
    res = trainer.train(cfg_for(tmp_path / "b", shards, init=str(tmp_path / "a" / "run" / "model"), adapter_rank=8, **kw))
    assert load_model(Path(res["out_dir"]) / "model").config.adapter.rank == 8
    with pytest.raises(TrainConfigError, match="raise only adapter_rank"):
        trainer.train(cfg_for(tmp_path / "c", shards, init=str(tmp_path / "a" / "run" / "model"), adapter_rank=2, **kw))


def test_a_stray_rank_variable_is_refused_not_run_silently(tmp_path: Path, monkeypatch, capsys) -> None:
    # RANK is torch.distributed's; outside torchrun it would make this a non-main rank that writes nothing
    monkeypatch.setenv("RANK", "64")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_main([f"out_dir={tmp_path / 'x'}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: environment RANK=64, WORLD_SIZE=1") and "unset RANK" in err
    monkeypatch.setenv("RANK", "zero")
    assert train_main([f"out_dir={tmp_path / 'x'}", "--dry-run"]) == 2
    assert "must be integers" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist_from_env() == Dist(1, 2, 0)
