"""The one registry of environment variables hwcompat reads or sets.

Reading goes through :func:`get`, which refuses names not listed here, so a
new variable cannot sneak in without a comment saying why it exists.
"""

from __future__ import annotations

import os
from typing import Mapping

from hwcompat.readings import VENDOR_FACTS

#: Variables hwcompat itself reads.
READS: dict[str, str] = {
    "HWCOMPAT_EMULATE": "comma list of catalog device names to emulate instead of probing (containers, CI)",
    "HWCOMPAT_EMULATE_FILE": "path of a YAML list of raw device readings to emulate",
    "HWCOMPAT_PROFILE": "force this profile family for every GPU (same as --profile)",
    "HWCOMPAT_PROFILES_DIR": "load profiles from this folder instead of the packaged ones",
    "HWCOMPAT_ALLOW_MISMATCH": "image entrypoint: run even when the device is not the image's family",
    "HWCOMPAT_IMAGE_FAMILY": "set by each image (its family): the entrypoint refuses a card of another family",
    "HWCOMPAT_CACHE_DIR": "where converted demo models are cached (default ~/.cache/hwcompat)",
    "HWCOMPAT_OUTPUT_ROOT": "set by the images (/output): a config's relative output_dir lands there, not on the "
                            "read-only /data mount (hwcompat/container.py)",
    "HSA_OVERRIDE_GFX_VERSION": "ROCm: makes the runtime treat the GPU as another gfx target; read to report the effective target",
    "CUDA_VISIBLE_DEVICES": "read by doctor: a user-set mask changes which devices torch sees",
    "HIP_VISIBLE_DEVICES": "read by doctor: the ROCm counterpart of CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER": "read by doctor: must be PCI_BUS_ID so NVML and torch indices agree",
    "PYTORCH_CUDA_ALLOC_CONF": "read by doctor: compared with the profile's allocator setting",
    "PYTORCH_HIP_ALLOC_CONF": "read by doctor: ROCm allocator setting",
    "ZE_AFFINITY_MASK": "read by doctor: Level Zero's device mask, the Intel counterpart of CUDA_VISIBLE_DEVICES",
    "LD_PRELOAD": "read by the launcher: a preload the user set is kept (a malloc of their own wins over tcmalloc)",
    "CONDA_PREFIX": "read by the launcher: an active conda env's lib/ is searched for tcmalloc",
    "PATH": "read by the launcher's tcmalloc probe: the preload test runs `true` from the user's PATH",
    "WORLD_SIZE": "set by torchrun: how many training processes in all (1 when unset: no process group)",
    "LOCAL_WORLD_SIZE": "set by torchrun: processes on this machine (machines = WORLD_SIZE / LOCAL_WORLD_SIZE)",
    "LOCAL_RANK": "set by torchrun: this process's index on its machine (0 prints bars and exports)",
    "HF_HOME": "`hwcompat plan --model ORG/NAME`: the Hugging Face cache's root, where a hub id's config is found",
    "HF_HUB_CACHE": "`hwcompat plan --model ORG/NAME`: the Hugging Face hub cache itself (wins over HF_HOME)",
    "MLFLOW_EXPERIMENT_NAME": "report_to: [mlflow]: the user's experiment name (default: hwcompat)",
    "TRACKIO_PROJECT": "report_to: [trackio]: the user's project name (default: hwcompat)",
    "WANDB_PROJECT": "report_to: [wandb]: the user's project name (default: hwcompat)",
}

#: Variables a profile may set in the training process (validated by the profile schema).
SETS: dict[str, str] = {
    "PYTORCH_CUDA_ALLOC_CONF": "CUDA caching allocator options; expandable_segments avoids fragmentation OOMs",
    "PYTORCH_HIP_ALLOC_CONF": "ROCm caching allocator options",
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID makes CUDA indices match NVML's (and nvidia-smi's)",
    "CUDA_VISIBLE_DEVICES": "pin the training process to the chosen NVIDIA device(s)",
    "HIP_VISIBLE_DEVICES": "pin the training process to the chosen AMD device(s)",
    "ZE_AFFINITY_MASK": "pin the training process to the chosen Intel device(s) (Level Zero's device mask)",
    "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1 makes Level Zero number devices in PCI order, the order detect's Intel "
                                     "indices count (the iGPU included)",
    "SYCL_CACHE_PERSISTENT": "1 keeps JIT-compiled SYCL kernels on disk (Intel XPU): later runs skip compiling them",
    "TORCHDYNAMO_DISABLE": "1 turns torch.compile into a no-op; needed where Triton cannot run (CC < 7.0)",
    "HSA_OVERRIDE_GFX_VERSION": "run a gfx target the ROCm wheels lack as a close one they have",
    "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1 enables AOTriton flash/mem-efficient SDPA on RDNA3/4",
    "OMP_NUM_THREADS": "CPU training: one thread per physical core",
    "TOKENIZERS_PARALLELISM": "false silences the fork warning of HF tokenizers in data loaders",
    "HF_HUB_OFFLINE": "1 in the trainer (and the images) unless the config names a hub id with allow_network: true",
}

#: Variables the launcher sets from what the host has, never from a profile (a profile may not preload code).
HOST_SETS: dict[str, str] = {
    "LD_PRELOAD": "a CPU run: the launcher preloads tcmalloc in the worker (cpu_allocator; probe/malloc.py)",
    "TRACKIO_DIR": "report_to: [trackio]: Trackio's local store, RUN/trackio unless the user set it (read at import)",
    "MLFLOW_TRACKING_URI": "report_to: [mlflow]: MLflow's file store RUN/mlruns unless the user set a tracking URI",
    "MLFLOW_ALLOW_FILE_STORE": "true with that file store: MLflow 3 keeps it in maintenance and asks for this opt-in",
    "WANDB_MODE": "report_to: [wandb]: offline unless the user set it (nothing leaves the machine by default)",
    "TQDM_DISABLE": "1 when stderr is not a terminal (a file, a pipe, docker logs): third-party bars (weight loading, "
                    "GGUF dequantisation) would write carriage-return frames there; hwcompat prints plain lines",
    "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "with tcmalloc: 1 TiB, so loading a model prints no 'large alloc' lines",
}


#: The variable that pins a process to some of a vendor's devices (the launcher, ``env`` and ``selftest``);
#: the fact itself is a column of ``readings.VENDOR_FACTS``.
VISIBILITY: dict[str, str] = {vendor: f.visibility for vendor, f in VENDOR_FACTS.items() if f.visibility}


def get(name: str, environ: Mapping[str, str] | None = None, default: str | None = None) -> str | None:
    """Return a registered variable's value, or ``default`` when unset or empty. A variable hwcompat sets (SETS,
    HOST_SETS) may be read back too (the trainer checks its profile environment arrived)."""
    if name not in READS and name not in SETS and name not in HOST_SETS:
        raise KeyError(f"{name} is not in hwcompat.envvars.READS; register it with a comment first")
    value = (os.environ if environ is None else environ).get(name)
    return value if value else default
