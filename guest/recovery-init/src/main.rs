//! recovery-init: see the library docs for the boot sequence and markers.

use nx_guest::marker::emit;
use nx_guest::state::{self, BootMode};
use nx_guest::supervisor::Supervisor;
use nx_guest::{pid1, port};
use recovery_init::{
    ready_marker, select_target, services, shell_service, M_SERVICES, M_START, M_TARGET,
};
use std::path::Path;
use std::time::Duration;

const P: &str = "recovery";

fn main() {
    let early = pid1::early(P);
    let state_root = Path::new(state::STATE_MOUNT);
    let record = match &early.state_dev {
        Some(dev) => {
            emit(&format!(
                "{P}: /state mounted ({} on /state)",
                dev.display()
            ));
            match state::read_next_mode(state_root) {
                Ok(r) => r,
                Err(e) => {
                    emit(&format!("{P}: next-boot record ignored and removed ({e})"));
                    if let Err(e) = state::consume_next_mode(state_root) {
                        emit(&format!(
                            "{P}: error: cannot remove the next-boot record ({e})"
                        ));
                    }
                    None
                }
            }
        }
        None => {
            emit(&format!(
                "{P}: /state stub/placeholder: no ext4 disk labelled \"state\"; flash staging, the next-boot record and diag are unavailable"
            ));
            None
        }
    };
    let (target, reason) = select_target(&early.cmdline, record);
    emit(M_TARGET);
    emit(&format!(
        "{P}: target={} reason={}",
        target.as_str(),
        reason.as_str()
    ));
    if target == BootMode::Normal {
        emit(&format!(
            "{P}: normal was requested but this is the recovery ramdisk (the boot firmware picks the ramdisk); staying in recovery"
        ));
    }
    if record == Some(BootMode::Recovery) {
        // The one-shot record asked for this boot: consume it.
        if let Err(e) = state::consume_next_mode(state_root) {
            emit(&format!(
                "{P}: error: cannot consume the next-boot record ({e})"
            ));
        }
    }
    emit(M_START);
    emit(&format!("{P}: {} modules loaded", early.modules));

    let mut sup = Supervisor::new(P);
    for svc in services(&early.cmdline, &|p| Path::new(p).exists()) {
        sup.add(svc);
    }
    sup.start_due();
    emit(&format!("{P}: started {}", sup.names().join(", ")));
    emit(M_SERVICES);

    match port::wait(port::FLASH_PORT, Duration::from_secs(5)) {
        Ok(dev) => emit(&ready_marker(&dev.display().to_string())),
        Err(e) => emit(&format!("{P}: error: flash port missing ({e}); is QEMU started with the com.nexus.flash virtserialport?")),
    }
    if let Some(up) = pid1::uptime() {
        emit(&format!("{P}: uptime {up:.2} s at ready"));
    }
    sup.add(shell_service());
    let action = sup.run();
    pid1::finish(P, action)
}
