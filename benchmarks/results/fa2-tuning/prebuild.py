"""Build every variant's library into $JAXINFER_CACHE_DIR (parallel; skips ones present).

Tag 'base' is the pre-change kernel (build/fa2-tuning/base/), placed at the cache path of its
dummy define so that ops.ensure_registered loads it unchanged.
usage: prebuild.py ARCH VARIANTS_FILE [TAG...]
"""
import subprocess, sys
from pathlib import Path
from jaxinfer.backends.ffi import build

arch, vfile, *only = sys.argv[1:]
here = Path(__file__).resolve().parent
procs = []
for line in Path(vfile).read_text().split("\n"):
    if not line.strip():
        continue
    tag, d = line.split()[:2]
    if only and tag not in only:
        continue
    defines = tuple(x for x in d.split(",") if x and x != "-")
    target = build.library_path("fa2", arch, defines)
    if target.is_file() or any(target == t for t, _ in procs):
        print("have", tag, target, flush=True)
        continue
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = build.nvcc_command("fa2", arch, target, defines)
    if tag == "base":
        cmd[cmd.index(str(build.CSRC / "fa2_ffi.cu"))] = str(here / "base" / "fa2_ffi.cu")
    print("build", tag, target, flush=True)
    procs.append((target, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
for target, p in procs:
    _, err = p.communicate()
    print(target.parent.name, "rc", p.returncode, err[-2000:] if p.returncode else "", flush=True)
