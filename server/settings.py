"""All user-facing settings in one object, with their documentation.

Sources, strongest first: command-line flags (passed as init kwargs by server/cli.py),
`COSERVE_*` environment variables, a YAML file (`--config` / `COSERVE_CONFIG`), then
the defaults below. `configs/default.yaml` lists every default; the CLI generates one
flag per field from these descriptions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from engine.config import EngineConfig

ENV_PREFIX = "COSERVE_"


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by the `config` setting (CLI flag or env var).

    The path is itself a setting, so it is looked up in the stronger sources first;
    pydantic-settings' own YAML source only takes a path fixed on the class.
    """

    def __init__(self, settings_cls: type[BaseSettings], init: InitSettingsSource):
        super().__init__(settings_cls)
        self._init = init

    def _config_path(self) -> str | None:
        return self._init.init_kwargs.get("config") or os.environ.get(f"{ENV_PREFIX}CONFIG")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ below reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = self._config_path()
        if not path:
            return {}
        if not Path(path).is_file():
            raise FileNotFoundError(f"settings file {path} does not exist")
        return YamlConfigSettingsSource(self.settings_cls, yaml_file=path)()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    config: Path | None = Field(None, description="YAML settings file; its values sit below env vars and flags")
    model: str | None = Field(
        None,
        description="Hugging Face model directory or .gguf file; unset = the embedded SmolLM2-135M-Instruct",
    )
    served_model_name: str | None = Field(
        None, description="Name clients pass as `model`; unset = derived from the model path"
    )
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    data_dir: Path = Field(
        Path("~/.local/share/coserve"), description="Directory for uploaded files, jobs and adapters"
    )
    cache_dir: Path = Field(
        Path("~/.cache/coserve"), description="Cache directory (models converted from GGUF, CPU GEMM probe results)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight and activation type; auto = on a GPU bfloat16 where supported, on a CPU whichever "
        "of float32 and bfloat16 its GEMMs run faster, measured once per CPU at start-up",
    )
    decode_weights: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weights read by small batches on the CPU (up to 16 rows; 128 on CPUs with AVX2 but not "
        "AVX-512): bfloat16 panels halve the bytes of a float32 decode step, arithmetic stays float32; auto = "
        "panels up to the row count where they measured faster (with dtype auto), bfloat16 = up to 16 rows, "
        "float32 = never",
    )
    kv_cache_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Type of the KV cache: auto = the model's, except a float32 model on the CPU with dtype auto, "
        "whose cache is bfloat16 where its decode attention measures no slower at start-up (half the bytes read "
        "per decode step, twice the tokens cached); bfloat16 under a float32 model works on the CPU only",
    )
    device: str = Field("cpu", description="Torch device for the engine (cpu, cuda, cuda:1, ...)")
    block_size: int = Field(16, gt=0, description="Tokens per KV-cache block (a power of two)")
    kv_cache_memory_gb: float = Field(2.0, gt=0, description="Memory reserved for the KV cache, in GiB")
    max_num_batched_tokens: int = Field(2048, gt=0, description="Token budget of one engine iteration")
    max_num_seqs: int = Field(128, gt=0, description="Most sequences running in one engine iteration")
    prefill_pack_tokens: int | None = Field(
        None, gt=0, description="Prefill tokens an iteration packs past its oldest prefill (which may take the "
        "whole budget): a burst of prompts gets first tokens one iteration after another instead of all after one "
        "long iteration; unset = on a CPU with dtype auto, the smallest chunk the GEMM probe measured at full "
        "rate, else the whole budget",
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Cap on prompt + completion tokens; unset = the model's context length"
    )
    num_threads: int | None = Field(
        None, gt=0, description="CPU threads for the engine (each tensor-parallel rank); unset = the cores shared out"
    )
    tensor_parallel_size: int = Field(
        1, gt=0, description="Processes the model is split over (Megatron-style: heads and MLP columns, gloo on "
        "the CPU, NCCL on GPUs); must divide the model's attention heads, KV heads and intermediate size"
    )
    max_queued_requests: int = Field(
        256, ge=0, description="Sequences allowed to wait beyond max_num_seqs; more get 429 with Retry-After"
    )
    max_request_body_bytes: int = Field(
        16 * 1024**2, gt=0, description="Largest JSON request body; larger ones get 413 (uploads have their own limit)"
    )
    max_upload_bytes: int = Field(512 * 1024**2, gt=0, description="Largest file a /v1/files upload may hold")
    max_concurrent_requests_per_owner: int = Field(
        0, ge=0, description="Completions in flight per owner (API key owner); more get 429; 0 = no limit"
    )
    max_active_jobs_per_owner: int = Field(
        0, ge=0, description="Finetuning jobs per owner not yet finished (validating, queued, running, paused); "
        "0 = no limit"
    )
    max_stored_bytes_per_owner: int = Field(
        0, ge=0, description="Bytes of uploaded files an owner may keep; 0 = no limit"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long requests in flight may take to finish before they are "
        "ended with a 503"
    )
    lora_modules: list[str] = Field(
        [], description="LoRA adapters (PEFT directories) served from start, each as name=path"
    )
    lora_roots: list[Path] = Field(
        [], description="Directories /v1/load_lora_adapter may load from; empty = no loading at run time"
    )
    max_loras: int = Field(8, ge=1, description="LoRA adapters resident for compute at once")
    max_cpu_loras: int = Field(
        32, ge=1, description="LoRA adapters kept in host memory (LRU), resident ones included"
    )
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank accepted; sizes the compute slots")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of prompt prefixes that earlier requests computed"
    )
    max_pinned_kv_fraction: float = Field(
        0.25, ge=0, le=1, description="Most of the KV cache that requests' kv_ttl may keep pinned at once"
    )
    max_kv_ttl_s: float = Field(600.0, ge=0, description="Longest kv_ttl a request may ask for, in seconds")
    ttft_slo_ms: float = Field(2000.0, gt=0, description="Time-to-first-token SLO, in milliseconds")
    tpot_slo_ms: float = Field(
        200.0, gt=0, description="Time-per-output-token SLO (ms); finetuning only fills iterations predicted within it"
    )
    finetune_backward_layers_per_iteration: int = Field(
        8, ge=1, description="Most layers of finetuning backward recomputed per engine iteration, all jobs together "
        "(next to inference, the latency model sizes the slice within the TPOT SLO)"
    )
    power_device: Literal["auto", "nvml", "simulated", "none"] = Field(
        "auto",
        description="Accelerator watched for clock, power and energy: auto = NVML on a CUDA device, none on the CPU; "
        "simulated = a modelled H100 (tests and what-if studies only)",
    )
    power_mode: Literal["off", "advise", "apply"] = Field(
        "advise",
        description="GPU frequency governor: off; advise = export the SLO-safe target clock; "
        "apply = lock SM clocks through NVML (needs root; clocks are reset on exit)",
    )
    api_key: str | None = Field(
        None, description="One admin key (owner `admin`); with it or api_keys_file set, /v1 routes need "
        "`Authorization: Bearer <key>`"
    )
    api_keys_file: Path | None = Field(
        None, description="YAML or JSON file of keys, each with its owner and role (user or admin); "
        "re-read on SIGHUP"
    )
    protect_health_and_metrics: bool = Field(
        False, description="Require an API key on /health, /metrics and /version too (any valid key)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging level")

    @field_validator("data_dir", "cache_dir")
    @classmethod
    def _expand_home(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("lora_modules")
    @classmethod
    def _name_equals_path(cls, modules: list[str]) -> list[str]:
        names = set()
        for module in modules:
            name, sep, path = module.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules entries are name=path, got {module!r}")
            if name in names:
                raise ValueError(f"lora_modules names the adapter {name!r} twice")
            names.add(name)
        return modules

    @field_validator("max_cpu_loras")
    @classmethod
    def _cpu_holds_resident(cls, value: int, info) -> int:
        if value < info.data.get("max_loras", 1):
            raise ValueError("max_cpu_loras must be at least max_loras")
        return value

    def lora_module_paths(self) -> dict[str, Path]:
        return {
            name: Path(path).expanduser().resolve()
            for name, _, path in (module.partition("=") for module in self.lora_modules)
        }

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        assert isinstance(init_settings, InitSettingsSource)
        return init_settings, env_settings, _YamlFileSource(settings_cls, init_settings)

    def engine_config(self, model_dir: Path) -> EngineConfig:
        return EngineConfig(
            model_dir=model_dir,
            cache_dir=self.cache_dir,
            dtype=self.dtype,
            decode_weights=self.decode_weights,
            kv_cache_dtype=self.kv_cache_dtype,
            device=self.device,
            block_size=self.block_size,
            kv_cache_memory_gb=self.kv_cache_memory_gb,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            prefill_pack_tokens=self.prefill_pack_tokens,
            max_model_len=self.max_model_len,
            num_threads=self.num_threads,
            tensor_parallel_size=self.tensor_parallel_size,
            lora_modules=tuple((name, str(path)) for name, path in self.lora_module_paths().items()),
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.max_lora_rank,
            enable_prefix_caching=self.enable_prefix_caching,
            max_pinned_kv_fraction=self.max_pinned_kv_fraction,
            max_kv_ttl_s=self.max_kv_ttl_s,
            ttft_slo_ms=self.ttft_slo_ms,
            tpot_slo_ms=self.tpot_slo_ms,
            finetune_backward_layers_per_iteration=self.finetune_backward_layers_per_iteration,
            power_device=self.power_device,
            power_mode=self.power_mode,
        )
