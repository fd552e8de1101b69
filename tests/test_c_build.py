"""The C client as a rig programmer builds it (runtime/clients/c/CMakeLists.txt): configured,
built and installed with CMake, then used by a program of the programmer's own through the
installed CMake package and through pkg-config; and its clock, which assumes no POSIX where the
header is used as plain C99 with a clock of the programmer's own. Skips without cmake,
pkg-config or libzmq's headers."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "runtime" / "clients" / "c"
CONSUMER = r"""
#include "svae_client.h"
int main(void) {
    void *ctx = zmq_ctx_new();
    void *sock = svae_connect(ctx, "tcp://127.0.0.1:9", 10);
    printf("%s %d %d\n", svae_strerror(SVAE_E_TIMEOUT), svae_now_ns() > 0, sock != NULL);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return 0;
}
"""
pytestmark = pytest.mark.slow  # a CMake configure, build and install, and three more builds


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    for tool in ("cmake", "pkg-config", "cc"):
        if not shutil.which(tool):
            pytest.skip(f"no {tool} here")
    if subprocess.run(["pkg-config", "--exists", "libzmq"]).returncode:
        pytest.skip("no libzmq for pkg-config (apt-get install libzmq3-dev)")
    tmp = tmp_path_factory.mktemp("cmake")
    prefix = tmp / "prefix"
    for step in (["cmake", "-S", str(SRC), "-B", str(tmp / "build"), f"-DCMAKE_INSTALL_PREFIX={prefix}",
                  "-DSVAE_BUILD_FUZZ=ON"],
                 ["cmake", "--build", str(tmp / "build")],
                 ["cmake", "--install", str(tmp / "build")]):
        out = subprocess.run(step, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp / "build" / "svae_demo").exists() and (tmp / "build" / "fuzz_reply").exists()
    return prefix


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)


def test_installs_the_headers_a_cmake_package_and_a_pkg_config_file(installed):
    files = {str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file()}
    assert {"include/svae_client.h", "include/svae_protocol.h"} <= files
    assert any(f.endswith("svae_clientConfig.cmake") for f in files)
    assert any(f.endswith("pkgconfig/svae_client.pc") for f in files)


def test_a_program_builds_against_the_installed_cmake_package(installed, tmp_path):
    (tmp_path / "app.c").write_text(CONSUMER)
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(app C)\nset(CMAKE_C_STANDARD 99)\n"
        "set(CMAKE_C_EXTENSIONS OFF)\nfind_package(svae_client 2 REQUIRED)\n"
        "add_executable(app app.c)\ntarget_link_libraries(app PRIVATE svae::svae_client)\n")
    for step in (["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "b"), f"-DCMAKE_PREFIX_PATH={installed}"],
                 ["cmake", "--build", str(tmp_path / "b")]):
        out = _run(step)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    out = _run([str(tmp_path / "b" / "app")])
    assert out.stdout.split() == ["no", "reply", "in", "time", "(reconnect)", "1", "1"], out.stdout


def test_a_program_builds_with_pkg_config(installed, tmp_path):
    (tmp_path / "app.c").write_text(CONSUMER)
    pc = {**os.environ, "PKG_CONFIG_PATH": str(next(installed.rglob("pkgconfig")))}
    flags = _run(["pkg-config", "--cflags", "--libs", "svae_client"], env=pc).stdout.split()
    out = _run(["cc", "-std=c99", "-Wall", "-Werror", str(tmp_path / "app.c"), *flags, "-o", str(tmp_path / "app")])
    assert out.returncode == 0, out.stderr
    assert _run([str(tmp_path / "app")]).stdout.startswith("no reply in time")


def test_the_header_assumes_no_posix_clock(installed, tmp_path):
    """Strict C99 without POSIX: the header compiles with a clock of the programmer's own, and
    without one it stops with an error that says what to define."""
    (tmp_path / "app.c").write_text(CONSUMER)
    zmq = _run(["pkg-config", "--cflags", "--libs", "libzmq"]).stdout.split()
    base = ["cc", "-std=c99", "-pedantic", "-Wall", "-Werror", f"-I{installed / 'include'}", str(tmp_path / "app.c"),
            *zmq, "-o", str(tmp_path / "app")]
    own = _run([*base, "-DSVAE_NOW_NS()=((uint64_t)42)"])
    assert own.returncode == 0, own.stderr
    none = _run(base)
    assert none.returncode != 0 and "no monotonic clock" in none.stderr and "SVAE_NOW_NS" in none.stderr
