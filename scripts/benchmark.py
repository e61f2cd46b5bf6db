"""Side-by-side training-step and decoding benchmark: ours, torch.nn.Transformer, HF Marian.

One process, the same random token batches, sizes, precision, loss (label-smoothed cross-
entropy), optimizer (AdamW 0.9/0.98/1e-9), schedule and clipping for all:

    python scripts/benchmark.py --preset cpu-small            # 2-core CPU, fp32, ~1.5 min
    python scripts/benchmark.py --preset cpu-small --precision bf16  # CPU autocast (AMX)
    python scripts/benchmark.py --preset cpu-recipe --systems ours   # fp32 and bf16 rows
    python scripts/benchmark.py --preset gpu-base --decode    # base model, bf16, H100
    python scripts/benchmark.py --preset gpu-base --compile --json compiled.json
    python scripts/benchmark.py --summarize eager.json compiled.json  # one table

Systems: ``ours`` is ``transformer.trainer.train_step`` (what the trainer runs); ``torch``
is ``torch.nn.Transformer`` with embeddings, sinusoids and a tied output layer; ``marian``
is Hugging Face's ``MarianMTModel`` (``pip install -e .[bench]``); ``--decode`` adds our model
exported to CTranslate2, float and int8 weights. The ``ours-*`` systems
switch one speed lever off (``OURS_VARIANTS``) to measure what it is worth.

For each: target tokens/s, step time, peak memory (CUDA), FLOPs per step (counted once
with ``torch.utils.flop_counter``) and utilisation of the device's peak (H100/H200: 989
TFLOP/s dense bf16; elsewhere a measured matrix product); ``--decode`` adds beam search
against ``generate()``. docs/benchmarks.md has the method and the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformer import trainer  # noqa: E402
from transformer.attention import MultiHeadAttention  # noqa: E402
from transformer.config import OptimConfig, SchedConfig  # noqa: E402
from transformer.decoding import beam_search  # noqa: E402
from transformer.dropout import Dropout  # noqa: E402
from transformer.loss import label_smoothed_cross_entropy  # noqa: E402
from transformer.model import Transformer  # noqa: E402
from transformer.optim import build_optimizer, build_scheduler  # noqa: E402
from transformer.positional import sinusoids  # noqa: E402
from transformer.precision import Precision, resolve_device  # noqa: E402

PAD, BOS, EOS = 0, 1, 2


@dataclass
class Preset:
    d_model: int
    n_heads: int
    n_layers: int  # each of encoder and decoder
    d_ff: int
    vocab_size: int
    batch_size: int
    src_len: int
    tgt_len: int
    precision: str  # fp32 | bf16 | fp16, or several: "fp32,bf16" (one set of rows each)
    warmup: int  # untimed steps (compilation, allocator, cuDNN/cuBLAS heuristics)
    steps: int  # timed steps per round
    rounds: int  # timing rounds, interleaved over the systems
    decode_batch: int  # sentences per generate() call in the decoding benchmark
    decode_len: int  # tokens each sentence generates (EOS forbidden before, forced at)
    dropout: float = 0.1
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_len: int = 256


PRESETS = {
    "tiny": Preset(d_model=32, n_heads=4, n_layers=1, d_ff=64, vocab_size=101, batch_size=4,
                   src_len=7, tgt_len=6, precision="fp32", warmup=1, steps=1, rounds=2,
                   decode_batch=3, decode_len=5),  # a smoke test of this script
    "cpu-small": Preset(d_model=256, n_heads=4, n_layers=3, d_ff=1024, vocab_size=8000,
                        batch_size=64, src_len=24, tgt_len=24, precision="fp32",
                        warmup=3, steps=1, rounds=15, decode_batch=16, decode_len=24),
    # The Multi30k recipe's sizes (configs/experiment/multi30k_en_de.yaml, post-norm here
    # like every preset) at its ~4,096-token batches.
    "cpu-recipe": Preset(d_model=128, n_heads=4, n_layers=4, d_ff=256, vocab_size=4000,
                         batch_size=160, src_len=26, tgt_len=26, precision="fp32,bf16",
                         warmup=3, steps=1, rounds=15, decode_batch=16, decode_len=24),
    "gpu-base": Preset(d_model=512, n_heads=8, n_layers=6, d_ff=2048, vocab_size=32000,
                       batch_size=256, src_len=64, tgt_len=64, precision="bf16",
                       warmup=10, steps=20, rounds=1, decode_batch=128, decode_len=64),
}


@dataclass
class Batch:
    """The fields of ``transformer.data.Batch`` that ``train_step`` reads."""

    src_tokens: Tensor  # (B, S)
    tgt_input: Tensor  # (B, T): BOS + target[:-1]
    tgt_output: Tensor  # (B, T): target
    n_tgt_tokens: int


def random_batch(preset: Preset, device: torch.device, seed: int = 0) -> Batch:
    """Random tokens, no padding (ids 3.. so that no PAD/BOS/EOS appears inside)."""
    generator = torch.Generator().manual_seed(seed)
    B, S, T, V = preset.batch_size, preset.src_len, preset.tgt_len, preset.vocab_size
    src = torch.randint(3, V, (B, S), generator=generator)
    tgt = torch.randint(3, V, (B, T), generator=generator)
    tgt_input = torch.cat([torch.full((B, 1), BOS), tgt[:, :-1]], dim=1)
    return Batch(src.to(device), tgt_input.to(device), tgt.to(device), B * T)


# ---------------------------------------------------------------------------- systems


class TorchTransformer(nn.Module):
    """``torch.nn.Transformer`` with what it lacks for translation: scaled token
    embeddings shared by both sides, sinusoids, dropout and a tied output layer."""

    def __init__(self, p: Preset):
        super().__init__()
        self.embedding = nn.Embedding(p.vocab_size, p.d_model, padding_idx=PAD)
        nn.init.normal_(self.embedding.weight, 0.0, p.d_model**-0.5)
        self.register_buffer("positions", sinusoids(p.max_len, p.d_model), persistent=False)
        self.dropout = nn.Dropout(p.dropout)
        self.transformer = nn.Transformer(
            p.d_model, p.n_heads, p.n_layers, p.n_layers, p.d_ff, p.dropout,
            activation="relu", batch_first=True, norm_first=False)
        self.scale = math.sqrt(p.d_model)

    def embed(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens) * self.scale + self.positions[: tokens.size(1)]
        return self.dropout(x)  # (B, T, d)

    def forward(self, src_tokens: Tensor, tgt_tokens: Tensor) -> Tensor:
        T = tgt_tokens.size(1)
        causal = nn.Transformer.generate_square_subsequent_mask(T, src_tokens.device)
        src_padding = src_tokens.eq(PAD)
        states = self.transformer(
            self.embed(src_tokens), self.embed(tgt_tokens), tgt_mask=causal,
            src_key_padding_mask=src_padding, memory_key_padding_mask=src_padding,
            tgt_is_causal=True)
        return F.linear(states, self.embedding.weight)  # (B, T, V)


class Marian(nn.Module):
    """Hugging Face ``MarianMTModel`` configured like ours: post-norm, ReLU, scaled and
    shared embeddings, tied output, sinusoids, SDPA attention."""

    def __init__(self, p: Preset):
        super().__init__()
        from transformers import MarianConfig, MarianMTModel

        config = MarianConfig(
            vocab_size=p.vocab_size, decoder_vocab_size=p.vocab_size, d_model=p.d_model,
            encoder_layers=p.n_layers, decoder_layers=p.n_layers,
            encoder_attention_heads=p.n_heads, decoder_attention_heads=p.n_heads,
            encoder_ffn_dim=p.d_ff, decoder_ffn_dim=p.d_ff, activation_function="relu",
            dropout=p.dropout, attention_dropout=0.0, activation_dropout=0.0,
            scale_embedding=True, share_encoder_decoder_embeddings=True,
            tie_word_embeddings=True, max_position_embeddings=p.max_len,
            pad_token_id=PAD, decoder_start_token_id=BOS, bos_token_id=BOS,
            eos_token_id=EOS, forced_eos_token_id=None)
        config._attn_implementation = "sdpa"
        self.marian = MarianMTModel(config)

    def forward(self, src_tokens: Tensor, tgt_tokens: Tensor) -> Tensor:
        return self.marian(input_ids=src_tokens, attention_mask=src_tokens.ne(PAD),
                           decoder_input_ids=tgt_tokens, use_cache=False).logits


def build_ours(p: Preset) -> Transformer:
    return Transformer(p.vocab_size, p.vocab_size, d_model=p.d_model, n_heads=p.n_heads,
                       n_encoder_layers=p.n_layers, n_decoder_layers=p.n_layers, d_ff=p.d_ff,
                       dropout=p.dropout, share_embeddings="all", pad_id=PAD,
                       max_len=p.max_len)


PEERS: dict[str, Callable[[Preset], nn.Module]] = {"torch": TorchTransformer, "marian": Marian}


def peer_step(model: nn.Module, batch: Batch, optimizer, scheduler, scaler, precision: Precision,
              p: Preset) -> None:
    """The textbook step, with the same loss function, clipping and optimizer as ours."""
    with precision.autocast():
        logits = model(batch.src_tokens, batch.tgt_input)  # (B, T, V)
        loss, _ = label_smoothed_cross_entropy(logits.flatten(0, 1), batch.tgt_output.flatten(),
                                               p.label_smoothing, PAD)
    scaler.scale(loss / batch.n_tgt_tokens).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), p.clip_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Variant:
    """Our step with one lever changed, to measure what that lever is worth."""

    loss_fn: Callable | None = None  # None: the trainer's choice (trainer.choose_loss_fn)
    fused_adamw: bool | None = None  # None: as OptimConfig says (fused on CUDA)
    sync: bool = False  # one host sync a step (the `if finite:` check without fused AdamW)
    separate_qkv: bool = False  # three products for q, k, v instead of one
    native_dropout: bool = False  # F.dropout's Bernoulli mask on the CPU too
    compile_mode: str | None = None  # torch.compile's mode, with --compile


OURS_VARIANTS = {
    "ours": Variant(),  # exactly what the trainer runs
    "ours-plain-loss": Variant(loss_fn=trainer.logits_batch_loss),
    "ours-chunked-loss": Variant(loss_fn=trainer.batch_loss),
    "ours-sync": Variant(sync=True),
    "ours-separate-qkv": Variant(separate_qkv=True),
    "ours-native-dropout": Variant(native_dropout=True),
    "ours-fused-adamw": Variant(fused_adamw=True),
    "ours-foreach-adamw": Variant(fused_adamw=False),
    "ours-cudagraphs": Variant(compile_mode="reduce-overhead"),
}


def separate_projections(model: nn.Module) -> None:
    """Make every attention module project q, k and v by three products (the old way)."""
    def project_together(self, x: Tensor, projections: list[nn.Linear]) -> tuple[Tensor, ...]:
        return tuple(self.split_heads(projection(x)) for projection in projections)

    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.project_together = types.MethodType(project_together, module)


@dataclass
class System:
    name: str
    model: nn.Module  # the uncompiled module (FLOP counting, decoding)
    step: Callable[[], None]  # one full training step on the benchmark batch
    eager_step: Callable[[], None]  # the same, never compiled (to count FLOPs)


def build_system(name: str, p: Preset, batch: Batch, device: torch.device, compile: bool
                 ) -> System:
    torch.manual_seed(0)
    precision = Precision.resolve(p.precision, device)
    scaler = precision.grad_scaler()
    if name in OURS_VARIANTS:
        variant = OURS_VARIANTS[name]
        model = build_ours(p).to(device).train()
        if variant.separate_qkv:
            separate_projections(model)
        if variant.native_dropout:
            for module in model.modules():
                if isinstance(module, Dropout):
                    module.__class__ = nn.Dropout
        optimizer = build_optimizer(model, OptimConfig(fused=variant.fused_adamw), device)
        scheduler = build_scheduler(optimizer, SchedConfig(), max_steps=10**6)

        def our_step(loss_fn: Callable) -> Callable[[], None]:
            def step() -> None:
                if variant.compile_mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                output = trainer.train_step(model, [batch], optimizer, scaler, precision,
                                            p.clip_norm, p.label_smoothing, loss_fn)
                scheduler.step()  # the trainer's after an applied update (count_step)
                if variant.sync:
                    output.finite.item()
            return step

        # As the trainer does with trainer.compile=true: forward, loss and backward of the
        # whole step in one compiled graph.
        eager_fn = variant.loss_fn or trainer.choose_loss_fn(device, compile=False)
        compiled_fn = variant.loss_fn or trainer.choose_loss_fn(device, compile=True)
        compiled = torch.compile(compiled_fn, mode=variant.compile_mode)
        return System(name, model, our_step(compiled if compile else eager_fn),
                      our_step(eager_fn))

    model = PEERS[name](p).to(device).train()
    # The textbook optimizer: fused where PyTorch recommends it (CUDA).
    optimizer = build_optimizer(model, OptimConfig(fused=device.type == "cuda"), device)
    scheduler = build_scheduler(optimizer, SchedConfig(), max_steps=10**6)

    def peer(module: nn.Module) -> Callable[[], None]:
        return lambda: peer_step(module, batch, optimizer, scheduler, scaler, precision, p)
    return System(name, model, peer(torch.compile(model) if compile else model), peer(model))


# ---------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def register_cpu_attention_flops() -> None:
    """``flop_counter`` knows the CUDA attention kernels but not the CPU flash kernel."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                  **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one training step (matrix products and attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measured_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product, the best of several: the ceiling that this
    device reaches here (on a shared machine the others measure the neighbours). A dtype
    the CPU emulates (bf16 without AMX: ~0.0005 TFLOP/s) is measured at n = 512, where one
    1536 product would take 15 s."""
    n = 8192 if device.type == "cuda" else 1536
    if device.type == "cpu":
        probe = torch.ones(512, 512, dtype=dtype)
        start = time.perf_counter()
        probe @ probe
        if time.perf_counter() - start > 0.1:  # 2.7 GFLOP/s or less: emulated
            n = 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best, spent = float("inf"), 0.0
    for _ in range(12):
        if spent > 3.0:  # emulated bf16 takes seconds a product: its best of a few will do
            break
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        spent += time.perf_counter() - start
    return 2 * n**3 / best


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) used for utilisation. Measured, it is the
    faster of an fp32 and a ``precision`` matrix product: a CPU that emulates bf16 runs
    autocast's fp32 parts (attention, norms, the loss) far faster than its bf16 products,
    and utilisation against the bf16 rate alone would pass 100%."""
    datasheet = trainer.peak_flops(device) if precision in ("bf16", "fp16") else None
    if datasheet is not None:  # the trainer's table, so train/mfu and this agree
        return datasheet, f"{torch.cuda.get_device_name(device)} dense {precision} datasheet"
    rates = {name: measured_matmul_peak(device, dtype) for name, dtype in (
        ("fp32", torch.float32), (precision, {"bf16": torch.bfloat16, "fp16": torch.float16}
                                  .get(precision, torch.float32)))}
    best = max(rates, key=rates.get)
    return rates[best], f"measured {best} matmul" + (
        f" (faster than {precision}'s {rates[precision] / 1e12:.3g} TFLOP/s)"
        if best != precision else "")


def time_steps(step: Callable[[], None], n_steps: int, device: torch.device) -> float:
    """Seconds per step over ``n_steps`` back to back, one sync at each end."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / n_steps


def measure_training(names: list[str], p: Preset, batch: Batch, device: torch.device,
                     compile: bool, peak: float, on_result: Callable[[list[dict]], None]
                     ) -> list[dict]:
    """Each system: built, its FLOPs counted, warmed up, timed for a first round; then
    ``rounds - 1`` more rounds, interleaved (a, b, c, a, b, c, ...), so that a busy
    neighbour on a shared machine slows all of them alike. The best round counts (on a
    shared CPU the others measure the neighbours); the median is kept too.
    ``on_result(rows)`` is called as results come in (a killed run keeps them)."""
    systems, rows = [], []
    for name in names:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        memory_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        system = build_system(name, p, batch, device, compile)
        flops = count_flops(system.eager_step)  # one eager step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(p.warmup):  # compilation happens here
            system.step()
        synchronize(device)
        memory = (torch.cuda.max_memory_allocated(device) - memory_before
                  if device.type == "cuda" else None)  # its own, beyond the earlier systems
        rows.append(dict(system=name, compile=compile, flops_per_step=flops,
                         peak_memory_gib=memory / 2**30 if memory is not None else None,
                         warmup_s=time.perf_counter() - start, step_ms_rounds=[]))
        systems.append(system)
        log(f"{name}: built and warmed up in {rows[-1]['warmup_s']:.1f} s")
        time_round(system, rows[-1], p, batch, device, peak)
        on_result(rows)
    for _ in range(p.rounds - 1):
        for system, row in zip(systems, rows, strict=True):
            time_round(system, row, p, batch, device, peak)
        on_result(rows)
    return rows


def time_round(system: System, row: dict, p: Preset, batch: Batch, device: torch.device,
               peak: float) -> None:
    """Time ``p.steps`` steps and update the row's figures."""
    row["step_ms_rounds"].append(time_steps(system.step, p.steps, device) * 1e3)
    log(f"{system.name} round {len(row['step_ms_rounds'])}/{p.rounds}: "
        f"{row['step_ms_rounds'][-1]:.1f} ms/step")
    step_ms = min(row["step_ms_rounds"])
    row.update(step_ms=step_ms, median_step_ms=statistics.median(row["step_ms_rounds"]),
               tokens_per_s=batch.n_tgt_tokens / step_ms * 1e3,
               utilisation=row["flops_per_step"] / (step_ms * 1e-3) / peak)


def cpu_name() -> str:
    """The processor's model name (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- decoding


def measure_decoding(p: Preset, device: torch.device, beam: int, repeats: int = 2) -> list[dict]:
    """Beam search sentences/s, ours against Marian's ``generate()`` and our model in
    CTranslate2, every sentence exactly ``decode_len`` tokens long and then EOS (EOS
    forbidden before, forced at the end; CTranslate2: ``decode_len + 1`` steps, EOS never)."""
    precision = Precision.resolve(p.precision, device)
    src = random_batch(replace(p, batch_size=p.decode_batch), device, seed=1).src_tokens
    L = p.decode_len
    results = []

    def timed(name: str, generate: Callable[[], object]) -> None:
        with precision.autocast():
            generate()  # warmup
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                generate()
            synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        results.append(dict(system=name, beam=beam, sentences_per_s=src.size(0) / seconds,
                            tokens_per_sentence=L, batch=src.size(0)))
        log(f"decoding {name}: {results[-1]['sentences_per_s']:.1f} sentences/s")

    torch.manual_seed(0)
    ours = build_ours(p).to(device).eval()
    timed("ours beam_search", lambda: beam_search(
        ours, src, beam=beam, lenpen=1.0, max_len_a=0.0, max_len_b=L, min_len=L,
        bos_id=BOS, eos_id=EOS, pad_id=PAD, early_stopping=True))
    try:
        marian = Marian(p).marian.to(device).eval()
    except ImportError:
        log("decoding marian: transformers is missing (pip install -e .[bench]), skipped")
    else:
        with torch.inference_mode():
            # L tokens and then EOS: L + 1 new tokens, as ours generates.
            timed("marian generate()", lambda: marian.generate(
                input_ids=src, attention_mask=src.ne(PAD), num_beams=beam, do_sample=False,
                max_new_tokens=L + 1, min_new_tokens=L + 1, early_stopping=True,
                length_penalty=1.0))
    tokens = [[f"t{i}" for i in row] for row in src.tolist()]
    for name, translator in ctranslate2_translators(ours, p, device):
        # L + 1 decoder steps, as ours: EOS forbidden throughout, the last step ends them.
        timed(name, lambda t=translator: t.translate_batch(
            tokens, beam_size=beam, length_penalty=1.0, max_decoding_length=L + 1,
            min_decoding_length=L + 1, max_batch_size=0))
    return results


CT2_TYPES = {"fp32": ("float32", "int8"), "bf16": ("bfloat16", "int8_bfloat16"),
             "fp16": ("float16", "int8_float16")}  # each precision's float and int8 types


def ctranslate2_translators(model: Transformer, p: Preset, device: torch.device) -> list:
    """``[(name, ctranslate2.Translator)]``: ``model`` exported by our converter
    (transformer/ctranslate2_export.py) with float and int8 weights, run with as many
    threads as ours; none, with a line, without the ctranslate2 package."""
    try:
        import ctranslate2
        from ctranslate2.converters import Converter
    except ImportError:
        log("decoding ctranslate2: ctranslate2 is missing (pip install -e .[bench]), skipped")
        return []
    import tempfile

    from transformer.ctranslate2_export import build_spec

    class Exported(Converter):
        def _load(self):
            spec = build_spec(model, vocab, vocab)
            spec.config.add_source_eos = False  # the random sources carry no EOS: as ours
            return spec

    vocab = ["<pad>", "<s>", "</s>", "<unk>", *(f"t{i}" for i in range(4, p.vocab_size))]
    folder = tempfile.mkdtemp(prefix="ct2-benchmark-")
    translators = []
    for compute_type in CT2_TYPES[p.precision]:
        path = f"{folder}/{compute_type}"
        with torch.no_grad():
            Exported().convert(path, quantization=compute_type)
        translators.append((f"ctranslate2 {compute_type}", ctranslate2.Translator(
            path, device=device.type, compute_type=compute_type,
            intra_threads=torch.get_num_threads() if device.type == "cpu" else 0)))
    return translators


# ---------------------------------------------------------------------------- report


def format_table(reports: list[dict]) -> str:
    """One table over one or more runs' reports (eager and compiled, say); the ratio is to
    the fastest peer at the same precision. Utilisation is of each row's ``peak_source``."""
    rows = [row for report in reports for row in report["training"]]
    first = reports[0]
    lines = [f"training step, preset {first['preset']}, {first['device']}, torch "
             f"{first['torch']}, {first['date']}"
             + ("; freed memory retained (glibc)" if first.get("retain_freed_memory") else ""),
             f"{'system':<20}{'prec':>5}{'compile':>8}{'tok/s':>11}{'step ms':>9}{'median':>9}"
             f"{'GFLOP/step':>11}{'util':>7}{'peak GiB':>9}{'vs best peer':>13}"]
    precisions = list(dict.fromkeys(row.get("precision", first["sizes"]["precision"])
                                    for row in rows))
    for precision in precisions:
        group = [r for r in rows if r.get("precision", first["sizes"]["precision"]) == precision]
        peers = [r["tokens_per_s"] for r in group if r["system"] not in OURS_VARIANTS]
        best_peer = max(peers) if peers else None
        for r in group:
            memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
            ratio = f"{r['tokens_per_s'] / best_peer:.2f}x" if best_peer else "-"
            lines.append(f"{r['system']:<20}{precision:>5}{'yes' if r['compile'] else 'no':>8}"
                         f"{r['tokens_per_s']:>11,.0f}{r['step_ms']:>9.1f}"
                         f"{r['median_step_ms']:>9.1f}{r['flops_per_step'] / 1e9:>11.1f}"
                         f"{r['utilisation']:>7.1%}{memory:>9}{ratio:>13}")
        sources = {f"{r.get('peak_source', first.get('peak_source'))} "
                   f"({r.get('peak_flops', first.get('peak_flops')) / 1e12:.3g} TFLOP/s)"
                   for r in group}
        lines.append(f"  {precision}: utilisation of the {', '.join(sorted(sources))}")
        if verdict(group):
            lines.append(f"  {precision}: {verdict(group)}")
    ours = [r for r in rows if r["system"] in OURS_VARIANTS]
    if len(precisions) > 1 and ours:
        best = {precision: max((r for r in ours if r.get("precision") == precision),
                               key=lambda r: r["tokens_per_s"]) for precision in precisions}
        base = best[precisions[0]]["tokens_per_s"]
        lines.append("ours at each precision: " + ", ".join(
            f"{precision} {row['step_ms']:.0f} ms/step ({row['tokens_per_s'] / base:.2f}x "
            f"{precisions[0]})" for precision, row in best.items()))
    decoding = [r for report in reports for r in report["decoding"]]
    if decoding:
        lines.append(f"{'decoding':<20}{'beam':>8}{'sent/s':>11}{'tokens':>9}{'batch':>9}")
        lines += [f"{r['system']:<20}{r['beam']:>8}{r['sentences_per_s']:>11.1f}"
                  f"{r['tokens_per_sentence']:>9}{r['batch']:>9}" for r in decoding]
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """Our fastest against the fastest peer, tokens/s and peak memory."""
    ours = [r for r in rows if r["system"] in OURS_VARIANTS]
    peers = [r for r in rows if r["system"] not in OURS_VARIANTS]
    if not ours or not peers:
        return ""
    best, peer = (max(group, key=lambda r: r["tokens_per_s"]) for group in (ours, peers))

    def name(r: dict) -> str:
        return f"{r['system']}{' compiled' if r['compile'] else ''}"
    line = (f"best: {name(best)} {best['tokens_per_s']:,.0f} tok/s = "
            f"{best['tokens_per_s'] / peer['tokens_per_s']:.2f}x {name(peer)} "
            f"{peer['tokens_per_s']:,.0f} tok/s")
    peer_memory = [r["peak_memory_gib"] for r in peers if r["peak_memory_gib"] is not None]
    if best["peak_memory_gib"] is not None and peer_memory:
        line += (f"; peak memory {best['peak_memory_gib']:.2f} GiB vs the peers' "
                 f"{min(peer_memory):.2f}-{max(peer_memory):.2f} GiB")
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--systems", default="ours,torch,marian",
                        help=f"comma-separated, of {', '.join([*OURS_VARIANTS, *PEERS])}")
    parser.add_argument("--compile", action="store_true", help="torch.compile every system")
    parser.add_argument("--precision", type=precisions,
                        help="fp32, bf16 or fp16, or several (fp32,bf16): every system at "
                             "each (default: the preset's)")
    parser.add_argument("--steps", type=int, help="timed steps a round (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed steps (default: the preset's)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default: "
                        "the preset's); the best round of each system is reported")
    parser.add_argument("--decode", action="store_true", help="also the beam search benchmark")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--default-malloc", action="store_true",
                        help="on the CPU, leave glibc's thresholds as they are (the trainer "
                             "raises them: trainer.retain_freed_memory)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--summarize", nargs="+", metavar="JSON",
                        help="only print one table over these earlier --json results")
    return parser.parse_args(argv)


def precisions(text: str) -> str:
    """``--precision``'s value: names from fp32, bf16, fp16, comma-separated."""
    names = text.split(",")
    if not names or any(name not in ("fp32", "bf16", "fp16") for name in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give fp32, bf16 or fp16, or several "
                                         "separated by commas")
    return text


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.summarize:
        print(format_table([json.loads(Path(f).read_text()) for f in args.summarize]))
        return None
    p = PRESETS[args.preset]
    p = replace(p, steps=args.steps or p.steps, rounds=args.rounds or p.rounds,
                warmup=p.warmup if args.warmup is None else args.warmup,
                precision=args.precision or p.precision)
    device = resolve_device(args.device)
    # What the trainer does on the CPU; process-wide, so the peers run with it too.
    retained = device.type == "cpu" and not args.default_malloc and trainer.retain_freed_memory()
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU {cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, "
                        f"{torch.get_num_threads()} threads")
    report = dict(preset=args.preset, sizes=asdict(p), device=device_name,
                  torch=torch.__version__, retain_freed_memory=retained,
                  date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), training=[],
                  decoding=[])

    def save(rows: list[dict]) -> None:
        report["training"] = done + rows
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    done: list[dict] = []
    for precision in p.precision.split(","):  # one set of rows per precision, fp32 first
        at = replace(p, precision=precision)
        peak, peak_source = device_peak(device, precision)
        rows = measure_training(args.systems.split(","), at, random_batch(at, device), device,
                                args.compile, peak, save)
        if peak_source.startswith("measured"):  # once more, in case a neighbour was busy
            peak, peak_source = max((peak, peak_source), device_peak(device, precision))
        for row in rows:
            row.update(precision=precision, peak_flops=peak, peak_source=peak_source,
                       utilisation=row["flops_per_step"] / (row["step_ms"] * 1e-3) / peak)
        done += rows
        save([])
    if args.decode:
        report["decoding"] = measure_decoding(replace(p, precision=p.precision.split(",")[0]),
                                              device, args.beam)
        save([])
    print(format_table([report]))
    return report


if __name__ == "__main__":
    main()
