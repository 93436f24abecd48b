//! recovery-init: see the library docs for the boot sequence and markers.

use nx_contract::markers::{self, recovery as m};
use nx_contract::{ports, NextBoot};
use nx_guest::marker::show;
use nx_guest::state;
use nx_guest::supervisor::Supervisor;
use nx_guest::{pid1, port};
use recovery_init::{
    rearm_for_wipe, reboot_normal_after_wipe, select_target, services, shell_service,
    verify_threads, wipe_at_boot, WipeAtBoot, REBOOTD_CALL, REBOOTD_SOCK, REBOOTD_WAIT,
};
use std::path::Path;
use std::time::Duration;

const P: &str = "recovery";

fn main() {
    show(&m::start());
    let early = pid1::early(P);
    let state_root = Path::new(state::STATE_MOUNT);
    let record = match &early.state_dev {
        Some(dev) => {
            show(&markers::pid1::state_mounted(P, dev.display()));
            match state::read_next_mode(state_root) {
                Ok(r) => r,
                Err(e) => {
                    show(&m::next_boot_ignored(&e));
                    if let Err(e) = state::consume_next_mode(state_root) {
                        show(&m::next_boot_remove_failed(e));
                    }
                    None
                }
            }
        }
        None => {
            show(&m::state_stub());
            None
        }
    };
    // A pending factory wipe runs now: /state is mounted and no service has started yet.
    // The bootloader comes back here if the power is cut during it (the one-shot entry is
    // consumed by this boot, so it is set again); rebootd clears it with `mode(normal)` after.
    if early.state_dev.is_some() && rearm_for_wipe(state_root) {
        let vars = nx_guest::efivar::LoaderVars::system();
        if vars.available() {
            if let Err(e) = vars.write_string(
                nx_contract::loader::LOADER_ENTRY_ONESHOT,
                &format!("{}.conf", nx_contract::loader::RECOVERY_ENTRY_ID),
            ) {
                show(&m::wipe_oneshot_failed(e));
            }
        }
    }
    let wipe = wipe_at_boot(state_root, early.state_dev.is_some(), &mut |l| show(l));
    let (target, reason) = select_target(&early.cmdline, record);
    show(&m::target_selected());
    show(&m::target(target.as_str(), reason.as_str()));
    if target == NextBoot::Normal {
        show(&m::normal_requested_staying());
    }
    if record == Some(NextBoot::Recovery) {
        // The one-shot record asked for this boot: consume it.
        if let Err(e) = state::consume_next_mode(state_root) {
            show(&m::next_boot_consume_failed(e));
        }
    }
    show(&m::init_start());
    show(&markers::pid1::modules_loaded(P, early.modules));

    match verify_threads(&early.cmdline) {
        Ok(Some(n)) => show(&m::verify_threads(n)),
        Ok(None) => {}
        Err((value, why)) => show(&m::verify_threads_ignored(&value, why)),
    }
    let mut sup = Supervisor::new(P);
    for svc in services(&early.cmdline, &|p| Path::new(p).exists()) {
        sup.add(svc);
    }
    sup.start_due();
    show(&m::started(&sup.names()));
    show(&m::services_ready());

    match port::wait(ports::FLASH.name, Duration::from_secs(5)) {
        Ok(dev) => show(&m::ready(dev.display())),
        Err(e) => show(&m::flash_port_missing(e, ports::FLASH.name)),
    }
    // flashd serves the UART too when there is one (`--uart`, see `services`).
    if nx_guest::uart::present(Path::new(ports::UART.device)) {
        show(&m::ready(ports::UART.device));
    }
    if let Some(up) = pid1::uptime() {
        show(&markers::pid1::uptime_at_ready(P, up));
    }
    match &wipe {
        WipeAtBoot::Wiped(report) => {
            show(&m::wipe_complete(report.attempt));
            match reboot_normal_after_wipe(Path::new(REBOOTD_SOCK), REBOOTD_WAIT, REBOOTD_CALL) {
                Ok(true) => show(&m::rebooting_after_wipe()),
                Ok(false) => {
                    show(&m::reboot_after_wipe_stub());
                    sup.add(shell_service());
                }
                Err(e) => {
                    show(&m::reboot_after_wipe_failed(e));
                    sup.add(shell_service());
                }
            }
        }
        WipeAtBoot::Failed(_) => {
            show(&m::wipe_pending_failed());
            sup.add(shell_service());
        }
        WipeAtBoot::NoState | WipeAtBoot::NotRequested | WipeAtBoot::InvalidRemoved => {
            sup.add(shell_service());
        }
    }
    let action = sup.run();
    pid1::finish(P, action)
}
