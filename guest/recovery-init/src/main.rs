//! recovery-init: see the library docs for the boot sequence and markers.

use nx_guest::marker::emit;
use nx_guest::state::{self, BootMode};
use nx_guest::supervisor::Supervisor;
use nx_guest::{pid1, port};
use recovery_init::{
    ready_marker, reboot_normal_after_wipe, select_target, services, shell_service, wipe_at_boot,
    WipeAtBoot, M_SERVICES, M_START, M_TARGET, REBOOTD_CALL, REBOOTD_SOCK, REBOOTD_WAIT,
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
    // A pending factory wipe runs now: /state is mounted and no service has started yet.
    let wipe = wipe_at_boot(state_root, early.state_dev.is_some(), &mut |l| emit(l));
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
    match &wipe {
        WipeAtBoot::Wiped(report) => {
            emit(&format!(
                "{P}: factory wipe complete (attempt {}); asking rebootd for a normal boot",
                report.attempt
            ));
            match reboot_normal_after_wipe(Path::new(REBOOTD_SOCK), REBOOTD_WAIT, REBOOTD_CALL) {
                Ok(true) => emit(&format!(
                    "{P}: rebooting into normal after the factory wipe (no shell this boot)"
                )),
                Ok(false) => {
                    emit(&format!("{P}: error: rebootd recorded next boot = normal but cannot reboot here (stub); staying in recovery, type 'reboot'"));
                    sup.add(shell_service());
                }
                Err(e) => {
                    emit(&format!("{P}: error: cannot ask for the normal boot after the factory wipe ({e}); staying in recovery, type 'reboot normal'"));
                    sup.add(shell_service());
                }
            }
        }
        WipeAtBoot::Failed(_) => {
            emit(&format!(
                "{P}: factory wipe pending and failed: this boot stays in recovery (see the error above; 'diag' collects the logs)"
            ));
            sup.add(shell_service());
        }
        WipeAtBoot::NoState | WipeAtBoot::NotRequested | WipeAtBoot::InvalidRemoved => {
            sup.add(shell_service());
        }
    }
    let action = sup.run();
    pid1::finish(P, action)
}
