//! The stand-in's self-tests. The kernel engine's (`csrc/selftest.cpp`): grid-stride loops,
//! block barriers and warp shuffles over 1-D and 2-D blocks, a barrier not every thread reaches
//! reported as a deadlock (and the engine usable after it), concurrent launches from several
//! threads, and two of ferrotron's real kernels against scalar formulas. The driver's
//! (`csrc/driver_selftest.cpp`): under each stream schedule, a reader that does not wait for a
//! writer on another stream, or a buffer freed before its reader ran, reads NaN.

use std::process::Command;

fn run_self_test(exe: Option<&str>, schedule: &str) {
    let Some(exe) = exe else {
        assert!(
            std::env::var_os("FERROTRON_REQUIRE_NVRTC").is_none(),
            "CI must build the CUDA stand-in: no C++ compiler was found"
        );
        eprintln!("SKIPPED: no C++ compiler was found to build the CUDA stand-in");
        return;
    };
    let out = Command::new(exe)
        .env("FTEMU_SCHEDULE", schedule)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the self-test failed");
    assert!(text.contains("all passed"), "{text}");
}

#[test]
fn the_engine_passes_its_self_test() {
    run_self_test(ferrotron_cuda_emu::engine_selftest(), "lazy");
}

#[test]
fn the_driver_passes_its_self_test() {
    for schedule in ["lazy", "peers"] {
        run_self_test(ferrotron_cuda_emu::driver_selftest(), schedule);
    }
}
