//! init (normal PID 1): see the library docs.

use init::boot::{self, Outcome};
use init::system::{RpcDaemons, SysMounter, BOOTCTLD_SOCK, REBOOTD_SOCK};
use init::{options, services, M_READY, M_SERVICES, M_START};
use nx_guest::marker::emit;
use nx_guest::pid1;
use nx_guest::state::{self, BootMode};
use nx_guest::supervisor::Supervisor;
use std::path::Path;

const P: &str = "init";

fn main() {
    emit(M_START);
    let early = pid1::early(P);
    emit(&format!("{P}: {} modules loaded", early.modules));
    let state_root = Path::new(state::STATE_MOUNT);
    match &early.state_dev {
        Some(dev) => {
            emit(&format!("{P}: /state mounted ({} on /state)", dev.display()));
            match state::read_next_mode(state_root) {
                Ok(Some(BootMode::Normal)) => {
                    if let Err(e) = state::consume_next_mode(state_root) {
                        emit(&format!("{P}: error: cannot consume the next-boot record ({e})"));
                    }
                }
                Ok(Some(BootMode::Recovery)) => emit(&format!(
                    "{P}: next-boot record asks for recovery but the firmware booted normal; left for the next boot"
                )),
                Ok(None) => {}
                Err(e) => emit(&format!("{P}: next-boot record unreadable ({e}); left in place")),
            }
        }
        None => emit(&format!(
            "{P}: /state stub/placeholder: no ext4 disk labelled \"state\"; running without persistent state"
        )),
    }
    let mut sup = Supervisor::new(P);
    for svc in services(&early.cmdline, &|p| Path::new(p).exists()) {
        sup.add(svc);
    }
    sup.start_due();
    let names = sup.names();
    emit(&format!("{P}: started [{}]", names.join(", ")));
    emit(M_SERVICES);

    // Defence in depth: with a factory wipe pending, no slot is mounted (recovery wipes).
    let wipe = early
        .state_dev
        .as_ref()
        .and_then(|_| boot::wipe_pending(state_root));
    let outcome = match RpcDaemons::new(Path::new(BOOTCTLD_SOCK), Path::new(REBOOTD_SOCK)) {
        Ok(mut daemons) => match &wipe {
            Some(why) => boot::refuse_for_wipe(&mut daemons, why, &mut |line| emit(line)),
            None => boot::run(
                &mut daemons,
                &mut SysMounter::default(),
                options(&early.cmdline),
                &mut |line| emit(line),
            ),
        },
        Err(e) => {
            emit(&format!(
                "{P}: error: {e}; cannot talk to bootctld, no slot booted"
            ));
            Outcome::Degraded { why: e }
        }
    };
    match &outcome {
        Outcome::Rebooting { target } => {
            emit(&format!("{P}: waiting for rebootd's reboot into {target}"));
        }
        Outcome::Up { .. } | Outcome::Degraded { .. } => {
            if let Outcome::Degraded { why } = &outcome {
                emit(&format!("{P}: degraded: {why}"));
            }
            if let Some(up) = pid1::uptime() {
                emit(&format!("{P}: uptime {up:.2} s at ready"));
            }
            emit(M_READY);
        }
    }
    let action = sup.run();
    pid1::finish(P, action)
}
