"""Generation parity with transformers on a 4-layer Qwen2.5-0.5B-shaped model (GPU).

Forward parity is not generation parity: a KV-cache position, a RoPE offset or a stop rule can be
wrong while the full-sequence logits agree. transformers makes and saves a random Qwen2 (hidden
896, 14/2 heads, vocab 151936, tied; nonzero biases, norm weights away from 1); we load what it
wrote and decode greedily beside ``generate(do_sample=False)``.

Tolerances: logits within 1e-4 of the largest logit magnitude (fp32, TF32 off); greedy tokens equal
for 64 new tokens in fp32; in bf16 (our bf16 GEMM operands vs transformers' bf16 model) a mutual
top-5 check at the first divergence (vLLM's practice): each side's token is in the other's top 5.
"""
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.cuda
NEW_TOKENS = 64
PROMPT = np.random.default_rng(7).integers(0, 151936, 11)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, torch, transformers) -> Path:
    """What transformers itself writes for a random 4-layer Qwen2.5-0.5B-shaped model, plus a
    word-level tokenizer.json whose tokens name their ids (so the CLI's text is the token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    config = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                      num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2,
                                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                      max_position_embeddings=32768)
    from fixtures.hf.make_fixtures import live
    torch.manual_seed(0)
    model = live(transformers.Qwen2ForCausalLM(config), seed=1, matrix_std=None)  # matrices: transformers' init
    path = tmp_path_factory.mktemp("qwen2-4layer")
    model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(151936)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir, torch, transformers):
    torch.backends.cuda.matmul.allow_tf32 = False
    return transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()


@pytest.fixture(scope="module")
def ckpt(hf_dir):
    from model.checkpoint import load_checkpoint
    return load_checkpoint(hf_dir)


@pytest.fixture(scope="module")
def cache():
    from runtime import ModuleCache
    return ModuleCache(use_disk=False)


def hf_greedy(model, torch, prompt: np.ndarray) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt[None]).cuda(), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


def our_greedy(cache, ckpt, precision) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits each was chosen from, on our CUDA decoder."""
    from model.cuda_model import CudaBackend
    from model.cuda_decoder import CudaDecoder
    from model.optim import AdamWSettings
    backend = CudaBackend(ckpt.config, ckpt.params, AdamWSettings(), cache=cache, precision=precision)
    decoder = CudaDecoder(backend, max_len=len(PROMPT) + NEW_TOKENS)
    try:
        tokens, seen = [], [decoder.prefill(PROMPT)]
        for i in range(NEW_TOKENS):
            tokens.append(int(np.argmax(seen[-1])))
            if i < NEW_TOKENS - 1:
                seen.append(decoder.decode(tokens[-1]))
        return tokens, seen
    finally:
        decoder.close()
        backend.close()


def test_our_logits_from_transformers_checkpoint_match_transformers(cache, ckpt, hf_model, torch):
    from model.cuda_model import CudaBackend
    from model.optim import AdamWSettings
    from model.reference import ReferenceModel
    ids = np.random.default_rng(3).integers(0, 151936, (2, 37))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids).cuda()).logits.float().cpu().numpy()
    backend = CudaBackend(ckpt.config, ckpt.params, AdamWSettings(), cache=cache)
    try:
        ours = backend.logits(ids)
    finally:
        backend.close()
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-4 * scale
    assert np.abs(ReferenceModel(ckpt.config, ckpt.params).forward(ids[:1, :9]) - theirs[:1, :9]).max() <= 1e-4 * scale


def test_greedy_decoding_equals_transformers_generate_for_64_tokens_in_fp32(cache, ckpt, hf_model, torch):
    from model.precision import Precision
    ours, _ = our_greedy(cache, ckpt, Precision.FP32)
    assert ours == hf_greedy(hf_model, torch, PROMPT)


def test_ptxgen_generate_prints_the_tokens_transformers_generates(hf_dir, hf_model, torch, capsys):
    from model.cli import main
    prompt = " ".join(f"t{i}" for i in PROMPT)
    assert main(["generate", "--checkpoint", str(hf_dir), "--prompt", prompt, "--max-new-tokens",
                 str(NEW_TOKENS), "--device", "cuda"]) == 0
    words = capsys.readouterr().out.split()
    assert [int(w[1:]) for w in words[len(PROMPT):]] == hf_greedy(hf_model, torch, PROMPT)


def test_bf16_greedy_decoding_passes_mutual_top5_at_the_first_divergence(cache, ckpt, hf_dir, torch, transformers):
    from model.precision import Precision
    ours, our_logits = our_greedy(cache, ckpt, Precision.BF16)
    hf16 = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda().eval()
    theirs = hf_greedy(hf16, torch, PROMPT)
    diverged = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if diverged is None:
        return  # no divergence in 64 tokens: nothing to check at one
    prefix = np.concatenate([PROMPT, ours[:diverged]])
    with torch.no_grad():
        hf_logits = hf16(torch.tensor(prefix[None]).cuda()).logits[0, -1].float().cpu().numpy()
    top5 = lambda logits: set(np.argsort(logits)[-5:].tolist())  # noqa: E731
    assert ours[diverged] in top5(hf_logits), f"diverged at token {diverged}"
    assert theirs[diverged] in top5(our_logits[diverged]), f"diverged at token {diverged}"


def test_train_init_fine_tunes_a_transformers_checkpoint_on_the_gpu(tmp_path, capsys):
    from model.checkpoint import load_checkpoint
    from model.cli import main
    fixture = Path(__file__).parent / "fixtures" / "hf" / "qwen2-v5-bf16-sharded"
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def add(a, b):\n    return a + b\n" * 200)
    out = tmp_path / "run"
    assert main(["train", "--init", str(fixture), "--data", str(data), "--out", str(out), "--device", "cuda",
                 "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("device: cuda") and "init: weights from" in printed
    assert load_checkpoint(out).config == load_checkpoint(fixture).config
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def add", "--max-new-tokens", "4",
                 "--device", "cuda"]) == 0
    assert capsys.readouterr().out.startswith("def add")
