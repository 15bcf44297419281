"""Builds one C++ file from tests/cuda_emu/emu.h, kernels/common.cuh, the given
kernel families and a test driver: replaces the two inline-PTX f16
conversions and dynamic shared memory with their emulated forms."""
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parents[2]


def prep(src):
    src = src.replace('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));', "f = emu_h2f(v.bits);")
    src = src.replace('asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));', "r.bits = emu_f2h(v);")
    if "asm(" in src:
        sys.exit("prepare.py: inline PTX left that the emulator cannot run")
    return re.sub(r"extern __shared__ float (\w+)\[\];", r"float* \1 = (float*)emu_dyn_smem;", src)


families, driver, out = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
text = (root / "tests/cuda_emu/emu.h").read_text() + prep((root / "kernels/common.cuh").read_text())
for f in families:
    text += f"\n// ---- kernels/{f}.cu\n" + prep((root / "kernels" / f"{f}.cu").read_text())
text += "\n// ---- driver\n" + pathlib.Path(driver).read_text()
pathlib.Path(out).write_text(text)
