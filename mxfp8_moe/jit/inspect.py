"""Look inside a compiled kernel without a GPU: ptxas' resource report and the SASS.

Resources come from the ptxas -v report in NVRTC's log (jit.build compiles with -Xptxas=-v), not
from `cuobjdump --dump-resource-usage`: only ptxas reports spill stores and loads, and it gives the
kernel's own static shared memory, whereas the cubin's shared section also holds the 1 KB that
sm_80+ reserves for the system (outside the opt-in per-block limit).

SASS comes from nvdisasm (or cuobjdump -sass), found on PATH or in the nvidia-cuda-nvdisasm /
nvidia-cuda-cuobjdump wheels (the `test` extra).
"""

from __future__ import annotations

import collections
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path


class ToolNotFound(RuntimeError):
    """Neither PATH nor an nvidia-cuda-* wheel provides the requested CUDA binary utility."""


@functools.cache
def find_tool(name: str) -> str | None:
    """Path of a CUDA binary utility ("nvdisasm", "cuobjdump"): PATH first, then the pip wheels."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia  # namespace package shared by every nvidia-* wheel
    except ImportError:
        return None
    # cu13 wheels install into nvidia/cu13/bin, cu12 ones into nvidia/cuda_nvdisasm/bin etc.
    for root in sorted(nvidia.__path__):
        for candidate in sorted(Path(root).glob(f"*/bin/{name}")) + sorted(Path(root).glob(f"*/bin/{name}.exe")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def _run_on_cubin(argv: list[str], cubin: bytes) -> str:
    # The tools read files only; a private directory avoids name clashes between threads.
    with tempfile.TemporaryDirectory(prefix="mxfp8_moe_") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def sass(cubin: bytes) -> str:
    """The SASS of every function in `cubin` (nvdisasm, else cuobjdump -sass)."""
    errors = []
    for tool, args in (("nvdisasm", ["-c"]), ("cuobjdump", ["-sass"])):
        path = find_tool(tool)
        if path is None:
            continue
        try:
            return _run_on_cubin([path, *args], cubin)
        except RuntimeError as error:  # e.g. an old toolkit's nvdisasm that predates the arch
            errors.append(str(error))
    if errors:
        raise RuntimeError("disassembly failed:\n" + "\n".join(errors))
    raise ToolNotFound("no nvdisasm or cuobjdump: install nvidia-cuda-nvdisasm / nvidia-cuda-cuobjdump "
                       "(pip install 'mxfp8-moe[test]') or put the CUDA toolkit's bin on PATH")


# "/*04a0*/  @!P0 QMMA.SF.16832.F32.E4M3.E4M3.E8 R20, ..." -> the mnemonic. Hex encodings that
# cuobjdump prints on their own lines ("/* 0x... */") have a space after "/*" and do not match.
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", re.M)


def count_instructions(sass_text: str, opcodes) -> dict[str, int]:
    """How many instructions of `sass_text` match each of `opcodes`.

    An opcode matches a mnemonic by whole dot-separated fields from the left: "QMMA.SF" matches
    QMMA.SF.16832.F32.E4M3.E4M3.E8, "LDL" matches LDL.64 but not LDLK. Each instruction counts once,
    for the most specific opcode that matches, so ("QMMA.SF", "QMMA") splits block-scaled from plain
    QMMA, while ("QMMA",) alone counts both.
    """
    wanted = {op: tuple(op.upper().split(".")) for op in opcodes}
    by_specificity = sorted(wanted.items(), key=lambda item: -len(item[1]))
    counts = dict.fromkeys(wanted, 0)
    mnemonics = collections.Counter(_INSTRUCTION.findall(sass_text))
    for mnemonic, n in mnemonics.items():
        fields = tuple(mnemonic.split("."))
        for op, prefix in by_specificity:
            if fields[: len(prefix)] == prefix:
                counts[op] += n
                break
    return counts


# ptxas -v prints, per compiled function:
#   Compiling entry function 'NAME' for 'sm_120a'
#   Function properties for NAME
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   [Function properties for a non-inlined callee ...]
#   Used 56 registers, used 1 barriers, 128 bytes smem
# so a function's "Used" line can follow its callees' properties: split on "Compiling", not on
# "Function properties", and take the stack line that follows the function's own name.
_COMPILING = re.compile(r"Compiling (?:entry )?function '([^']+)'")
_STACK = r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
_USED = re.compile(r"Used (\d+) registers[^\n]*")
_SMEM = re.compile(r"(\d+) bytes smem")


def resource_usage(log: str, function: str | None = None) -> dict[str, int]:
    """Registers, stack frame, spill stores/loads and static shared memory (bytes) of one function,
    parsed from the ptxas -v report in an NVRTC log (CompileResult.log).

    `function` picks one when the log reports several (e.g. with -rdc); by default the log must
    describe exactly one. Static shared memory is 0 when ptxas reports none.
    """
    starts = list(_COMPILING.finditer(log))
    sections = {m.group(1): log[m.end():(starts[i + 1].start() if i + 1 < len(starts) else len(log))]
                for i, m in enumerate(starts)}
    if not sections:
        raise ValueError("no ptxas resource report in the log: compile with -Xptxas=-v")
    if function is None:
        if len(sections) != 1:
            raise ValueError(f"the log reports several functions, pick one of {sorted(sections)}")
        ((function, section),) = sections.items()
    elif function in sections:
        section = sections[function]
    else:
        raise ValueError(f"no ptxas report for {function!r}; the log has {sorted(sections)}")
    stack = re.search(r"Function properties for " + re.escape(function) + r"[^\n]*\n[^\n]*?" + _STACK, section)
    used = _USED.search(section)
    if stack is None or used is None:
        raise ValueError(f"incomplete ptxas report for {function!r}:\n{section.strip()}")
    smem = _SMEM.search(used.group(0))
    return {
        "registers": int(used.group(1)),
        "stack_frame": int(stack.group(1)),
        "spill_stores": int(stack.group(2)),
        "spill_loads": int(stack.group(3)),
        "static_shared": int(smem.group(1)) if smem else 0,
    }
