"""``python -m nnunetv2_llm.tools.benchmark --memory-probe REQUEST_JSON``: the memory probe's fresh process
(internal; ``memory.measure_memory`` starts it)."""

import sys

from nnunetv2_llm.tools.benchmark.memory import probe_entry

if __name__ == "__main__":
    sys.exit(probe_entry(sys.argv[1:]))
