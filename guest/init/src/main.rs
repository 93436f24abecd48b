//! init (normal PID 1): see the library docs.

use init::boot::{self, Outcome};
use init::system::{RpcDaemons, SysMounter, BOOTCTLD_SOCK, REBOOTD_SOCK};
use init::{options, services};
use nx_contract::markers::{self, init as m};
use nx_contract::NextBoot;
use nx_guest::marker::show;
use nx_guest::pid1;
use nx_guest::state;
use nx_guest::supervisor::Supervisor;
use std::path::Path;

const P: &str = "init";

fn main() {
    show(&m::start());
    let early = pid1::early(P);
    show(&markers::pid1::modules_loaded(P, early.modules));
    let state_root = Path::new(state::STATE_MOUNT);
    match &early.state_dev {
        Some(dev) => {
            show(&markers::pid1::state_mounted(P, dev.display()));
            match state::read_next_mode(state_root) {
                Ok(Some(NextBoot::Normal)) => {
                    if let Err(e) = state::consume_next_mode(state_root) {
                        show(&m::next_boot_consume_failed(e));
                    }
                }
                Ok(Some(NextBoot::Recovery)) => show(&m::next_boot_recovery_left()),
                Ok(None) => {}
                Err(e) => show(&m::next_boot_unreadable(e)),
            }
        }
        None => show(&m::state_stub()),
    }
    let mut sup = Supervisor::new(P);
    for svc in services(&early.cmdline, &|p| Path::new(p).exists()) {
        sup.add(svc);
    }
    sup.start_due();
    let names = sup.names();
    show(&m::started(&names));
    show(&m::services_ready());

    // Defence in depth: with a factory wipe pending, no slot is mounted (recovery wipes).
    let wipe = early
        .state_dev
        .as_ref()
        .and_then(|_| boot::wipe_pending(state_root));
    let outcome = match RpcDaemons::new(Path::new(BOOTCTLD_SOCK), Path::new(REBOOTD_SOCK)) {
        Ok(mut daemons) => match &wipe {
            Some(why) => boot::refuse_for_wipe(&mut daemons, why, &mut |line| show(line)),
            None => boot::run(
                &mut daemons,
                &mut SysMounter::default(),
                options(&early.cmdline),
                &mut |line| show(line),
            ),
        },
        Err(e) => {
            show(&m::no_bootctld(&e));
            Outcome::Degraded { why: e }
        }
    };
    match &outcome {
        Outcome::Rebooting { target } => {
            show(&m::waiting_for_reboot(target));
        }
        Outcome::Up { .. } | Outcome::Degraded { .. } => {
            if let Outcome::Degraded { why } = &outcome {
                show(&m::degraded(why));
            }
            if let Some(up) = pid1::uptime() {
                show(&markers::pid1::uptime_at_ready(P, up));
            }
            show(&m::ready());
        }
    }
    let action = sup.run();
    pid1::finish(P, action)
}
