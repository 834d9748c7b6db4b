"""llmq's GGUF exports against llama.cpp's own quantizer, in llama.cpp, on SmolLM2: perplexity, size, decode speed.

All in one run (each step's output is kept in --work, so a rerun continues where one stopped):

    # llama.cpp, built once from the source vendored in the llama-cpp-python sdist (~8 min on 2 cores):
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \\
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF && cmake --build build -j2 --target llama-quantize llama-imatrix \\
        llama-perplexity llama-bench llama-tokenize
    # then, in llmq's venv (the README's):
    python benchmarks/gguf.py --llama-cpp .../llama.cpp/build/bin [--work /tmp/gguf-bench] [--threads 2]

What it does:
1. The full-precision model as llama.cpp's input: SmolLM2's GGUF dequantized to F32 (fp32.gguf, same metadata).
   Calibration text: `--nsamples` x `--seqlen` token windows (seed 0) from the second half of WikiText-2 test's token
   stream, decoded to calib.txt; evaluation text: the first `--eval-chunks` x 2048 tokens, decoded to eval.txt
   (disjoint from calibration).
2. llama.cpp: `llama-imatrix` on calib.txt (-c seqlen, one chunk per window), then `llama-quantize` of fp32.gguf to
   each mix, with and without that importance matrix.
3. llmq: `llmq quantize --method gptq --gguf-recipe MIX` with the same calibration windows (--calib-split test
   --calib-range 0.5:1, same seed), `--gptq-inputs fp --clip-search`, then `llmq export --to gguf`. The per-tensor
   types are checked against llama-quantize + imatrix's file (they must be the same).
4. Every file in llama.cpp: `llama-perplexity -f eval.txt -c 2048` (its protocol: each 2048-token chunk scored on
   its second half; SmolLM2's GGUF adds no BOS), file size, `llama-bench -p 0 -n 128` decode tokens/s.
5. Agreement: llama.cpp running the llmq file against llmq running its own checkpoint (llmq.load_quantized, the
   reference backend) on llama.cpp's own tokens of eval.txt with llama-perplexity's protocol; they differ by
   llama.cpp's 8-bit activation rounding (its CPU matmuls quantize activations to Q8).

Results: benchmarks/results/gguf.md + gguf.json.
"""
# The code is in gguf_llama_cpp.py. This file only runs it: named gguf.py, it shadows the gguf *package* for every
# `python benchmarks/X.py` (benchmarks/ leads sys.path), so when it is imported as `gguf` it hands the real package
# over (the importer receives what sys.modules holds once this file has run).
import sys

if __name__ == "gguf":
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    here = Path(__file__).resolve().parent
    spec = importlib.machinery.PathFinder.find_spec("gguf", [p for p in sys.path if Path(p or ".").resolve() != here])
    real = importlib.util.module_from_spec(spec)
    sys.modules["gguf"] = real
    spec.loader.exec_module(real)
elif __name__ == "__main__":
    from gguf_llama_cpp import main

    main()
