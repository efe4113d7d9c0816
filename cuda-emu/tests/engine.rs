//! The kernel engine's self-test (`csrc/selftest.cpp`): grid-stride loops, block barriers and
//! warp shuffles over 1-D and 2-D blocks, a barrier not every thread reaches reported as a
//! deadlock (and the engine usable after it), concurrent launches from several threads, and two
//! of ferrotron's real kernels against scalar formulas.

use std::process::Command;

#[test]
fn the_engine_passes_its_self_test() {
    let Some(exe) = ferrotron_cuda_emu::engine_selftest() else {
        assert!(
            std::env::var_os("FERROTRON_REQUIRE_NVRTC").is_none(),
            "CI must build the CUDA stand-in: no C++ compiler was found"
        );
        eprintln!("SKIPPED: no C++ compiler was found to build the CUDA stand-in");
        return;
    };
    let out = Command::new(exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the engine's self-test failed");
    assert!(text.contains("all passed"), "{text}");
}
