"""Speed of titok-lightning against the reference implementation on the same GPU, case by case.

Both sides run the same random weights: each case builds the reference model from a full-size reference
config, converts its state dict with this project's public conversion path and checks in fp32 that the
outputs agree before timing. Without ``--reference`` only this project's numbers are printed.

    python scripts/benchmark.py --reference /path/to/1d-tokenizer --cases titok_b64_train rar_b_sample

Prints one line per (case, implementation): throughput in images/s, ms per iteration and peak memory.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from titok_lightning.convert import load_reference_state_dict
from titok_lightning.models.maskgit import ImageBert
from titok_lightning.models.rar import RAR
from titok_lightning.models.titok import TiTok

TITOK_B64_STAGE1 = {
    "model": {
        "vq_model": {
            "codebook_size": 4096,
            "token_size": 12,
            "use_l2_norm": True,
            "commitment_cost": 0.25,
            "vit_enc_model_size": "base",
            "vit_dec_model_size": "base",
            "vit_enc_patch_size": 16,
            "vit_dec_patch_size": 16,
            "num_latent_tokens": 64,
            "finetune_decoder": False,
        }
    },
    "dataset": {"preprocessing": {"crop_size": 256}},
}
TITOK_L32_STAGE2 = copy.deepcopy(TITOK_B64_STAGE1)
TITOK_L32_STAGE2["model"]["vq_model"].update(
    vit_enc_model_size="large", vit_dec_model_size="large", num_latent_tokens=32, finetune_decoder=True
)
RAR_B = {
    "model": {
        "vq_model": {"codebook_size": 1024, "token_size": 256, "num_latent_tokens": 256},
        "generator": {
            "hidden_size": 768,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 3072,
            "dropout": 0.1,
            "attn_drop": 0.1,
            "class_label_dropout": 0.1,
            "image_seq_len": 256,
            "condition_num_classes": 1000,
            "randomize_temperature": 1.0,
            "guidance_scale": 16.0,
            "guidance_scale_pow": 2.75,
            "use_checkpoint": False,
            "randomness_anneal_start": 125000,
            "randomness_anneal_end": 187500,
        },
    },
    "dataset": {"preprocessing": {"crop_size": 256}},
}
MASKGIT_L32 = copy.deepcopy(TITOK_L32_STAGE2)
MASKGIT_L32["model"]["generator"] = {
    "model_type": "ViT",
    "hidden_size": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 3072,
    "dropout": 0.1,
    "attn_drop": 0.1,
    "num_steps": 8,
    "class_label_dropout": 0.1,
    "image_seq_len": 32,
    "condition_num_classes": 1000,
    "randomize_temperature": 9.5,
    "guidance_scale": 4.5,
    "guidance_decay": "linear",
}


DEVICE = "cuda"

# -- the reference, imported from a checkout --------------------------------------------------------------------


def import_reference(path: Path) -> types.SimpleNamespace:
    """Import the reference's modeling package; a stub stands in for `accelerate`, which only its
    quantizer's DDP gather uses."""
    sys.path.insert(0, str(path))
    try:
        import transformers  # noqa: F401  (before the stub: it probes for accelerate)
    except ImportError as err:
        print(f"# reference MaskGIT unavailable: {err}")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        stub = types.ModuleType("accelerate.utils.operations")
        stub.gather = lambda x: x
        sys.modules.update(
            {
                "accelerate": types.ModuleType("accelerate"),
                "accelerate.utils": types.ModuleType("accelerate.utils"),
                "accelerate.utils.operations": stub,
            }
        )
    from modeling import rar, titok
    from omegaconf import OmegaConf

    namespace = types.SimpleNamespace(OmegaConf=OmegaConf, titok=titok, rar=rar, maskgit=None)
    if "transformers" in sys.modules:
        from modeling import maskgit

        namespace.maskgit = maskgit
    return namespace


def reference_titok(ref, config: dict) -> torch.nn.Module:
    return ref.titok.TiTok(ref.OmegaConf.create(config))


# -- timing ---------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], iters: int, warmup: int) -> tuple[float, float]:
    """Mean seconds per call after warm-up, and peak memory in GiB."""
    cuda = DEVICE == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return (time.perf_counter() - start) / iters, memory


def report(case: str, impl: str, batch: int, seconds: float, memory: float, baseline: float | None) -> None:
    speedup = f"{baseline / seconds:5.2f}x" if baseline else "  -  "
    print(
        f"{case:22s} {impl:24s} {batch / seconds:9.1f} img/s {seconds * 1e3:9.1f} ms/it "
        f"{memory:6.1f} GiB  speed-up {speedup}",
        flush=True,
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- cases ----------------------------------------------------------------------------------------------------


def titok_train_step(model: torch.nn.Module, batch: int, dtype: torch.dtype) -> Callable[[], None]:
    """Stage-1 step: encode, proxy-code logits, cross-entropy + quantizer loss, backward, AdamW."""
    device = DEVICE
    model.train()
    pixels = torch.rand(batch, 3, 256, 256, device=device)
    targets = torch.randint(0, 1024, (batch, 16 * 16), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    def step() -> None:
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            z, info = model.encode(pixels)
            logits = model.decode(z)
        loss = F.cross_entropy(logits.float().flatten(2), targets) + info["quantizer_loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def titok_reconstruct(model: torch.nn.Module, batch: int, dtype: torch.dtype) -> Callable[[], None]:
    model.eval()
    pixels = torch.rand(batch, 3, 256, 256, device=DEVICE)

    @torch.no_grad()
    def run() -> None:
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            z, _ = model.encode(pixels)
            model.decode(z).clamp(0, 1)

    return run


def rar_train_step(model: torch.nn.Module, batch: int, dtype: torch.dtype) -> Callable[[], None]:
    model.train()
    ids = torch.randint(0, 1024, (batch, 256), device=DEVICE)
    condition = model.preprocess_condition(torch.randint(0, 1000, (batch,), device=DEVICE), 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03)

    def step() -> None:
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            logits, labels = model(ids, condition, return_labels=True)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def generator_sampling(sample: Callable[[torch.Tensor], object], batch: int, dtype: torch.dtype):
    labels = torch.randint(0, 1000, (batch,), device=DEVICE)

    @torch.no_grad()
    def run() -> None:
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            sample(labels)

    return run


def check(case: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    """Print the fp32 agreement of the two implementations (run under ``torch.backends`` without TF32)."""
    diff = max_diff(ours, theirs)
    status = "ok" if diff <= tol else "MISMATCH"
    print(f"# {case}: fp32 max |ours - reference| = {diff:.2e} ({status})", flush=True)


def run_case(case: str, args, ref) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    results: list[tuple[str, Callable[[], None]]] = []

    if case in ("titok_b64_train", "titok_l32_reconstruct"):
        config = TITOK_B64_STAGE1 if case == "titok_b64_train" else TITOK_L32_STAGE2
        batch = args.batch or DEFAULT_BATCH[case]
        make = titok_train_step if case == "titok_b64_train" else titok_reconstruct
        ours = TiTok.from_reference_config(config)
        if ref is not None:
            theirs = reference_titok(ref, config).to(DEVICE)
            load_reference_state_dict(ours, theirs.state_dict())
            ours.to(DEVICE).eval()
            theirs.eval()
            x = torch.rand(2, 3, 256, 256, device=DEVICE)
            with torch.no_grad():
                check(case, ours.decode(ours.encode(x)[0]), theirs.decode(theirs.encode(x)[0]), 5e-3)
            results.append(("reference", make(theirs, batch, dtype)))
        ours.to(DEVICE)
        results.append(("titok-lightning", make(ours, batch, dtype)))
        if args.compile:
            compiled = copy.deepcopy(ours)
            compiled.encoder = torch.compile(compiled.encoder)
            compiled.decoder = torch.compile(compiled.decoder)
            results.append(("titok-lightning+compile", make(compiled, batch, dtype)))

    elif case in ("rar_b_train", "rar_b_sample"):
        batch = args.batch or DEFAULT_BATCH[case]
        ours = RAR.from_reference_config(RAR_B)
        theirs = None
        if ref is not None:
            theirs = ref.rar.RAR(ref.OmegaConf.create(RAR_B)).to(DEVICE)
            load_reference_state_dict(ours, theirs.state_dict())
            ours.to(DEVICE).eval()
            theirs.eval()
            ids = torch.randint(0, 1024, (2, 256), device=DEVICE)
            cond = ours.preprocess_condition(torch.tensor([1, 2], device=DEVICE), 0.0)
            orders = torch.stack([torch.randperm(256, device=DEVICE) for _ in range(2)])
            with torch.no_grad():
                check(
                    case, ours.forward_fn(ids, cond, orders=orders), theirs.forward_fn(ids, cond, orders=orders), 5e-3
                )
        ours.to(DEVICE)
        if case == "rar_b_train":
            if theirs is not None:
                results.append(("reference", rar_train_step(theirs, batch, dtype)))
            results.append(("titok-lightning", rar_train_step(ours, batch, dtype)))
        else:
            settings = dict(guidance_scale=16.0, randomize_temperature=1.0, guidance_scale_pow=2.75)
            if theirs is not None:
                results.append(
                    ("reference", generator_sampling(lambda c: theirs.generate(c, **settings), batch, dtype))
                )
            results.append(("titok-lightning", generator_sampling(lambda c: ours.generate(c), batch, dtype)))

    elif case == "maskgit_l32_sample":
        batch = args.batch or DEFAULT_BATCH[case]
        ours = ImageBert.from_reference_config(MASKGIT_L32)
        if ref is not None and ref.maskgit is not None:
            theirs = ref.maskgit.ImageBert(ref.OmegaConf.create(MASKGIT_L32)).to(DEVICE).eval()
            load_reference_state_dict(ours, theirs.state_dict())
            ours.to(DEVICE).eval()
            ids = torch.randint(0, 4097, (2, 32), device=DEVICE)
            cond = torch.tensor([3, 4], device=DEVICE)
            with torch.no_grad():
                check(case, ours(ids, cond), theirs(ids, cond, cond_drop_prob=0.0), 5e-3)
            settings = dict(
                guidance_scale=4.5,
                guidance_decay="linear",
                randomize_temperature=9.5,
                softmax_temperature_annealing=True,
                num_sample_steps=8,
            )
            results.append(("reference", generator_sampling(lambda c: theirs.generate(c, **settings), batch, dtype)))
        ours.to(DEVICE).eval()
        results.append(("titok-lightning", generator_sampling(lambda c: ours.generate(c), batch, dtype)))
    else:
        raise SystemExit(f"unknown case {case!r}")

    batch = args.batch or DEFAULT_BATCH[case]
    baseline = None
    for impl, fn in results:
        try:
            seconds, memory = timed(fn, args.iters, args.warmup)
        except Exception as err:  # report and continue with the other implementations
            print(f"{case:22s} {impl:24s} FAILED: {type(err).__name__}: {err}", flush=True)
            continue
        if impl == "reference":
            baseline = seconds
        report(case, impl, batch, seconds, memory, baseline)


DEFAULT_BATCH = {
    "titok_b64_train": 32,
    "titok_l32_reconstruct": 64,
    "rar_b_train": 64,
    "rar_b_sample": 64,
    "maskgit_l32_sample": 64,
}
CASES = list(DEFAULT_BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="checkout of bytedance/1d-tokenizer to compare against")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--batch", type=int, default=0, help="batch size (default per case)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd tokenizer blocks")
    parser.add_argument("--device", default="cuda", help="cpu only for a dry run of the script itself")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    # TF32 convolutions (cuDNN's default) would blur the fp32 agreement check; the timed runs use autocast.
    torch.backends.cudnn.allow_tf32 = False
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: benchmark.py measures GPU speed (use --device cpu for a dry run)")
    ref = import_reference(args.reference) if args.reference else None
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"# {name} torch {torch.__version__} dtype {args.dtype}", flush=True)
    for case in args.cases:
        try:
            run_case(case, args, ref)
        except Exception as err:  # one broken case must not hide the others' figures
            print(f"{case:22s} FAILED: {type(err).__name__}: {err}", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
