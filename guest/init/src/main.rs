//! init (normal PID 1): see the library docs.

use bootctld::machine::Slot;
use init::boot::{self, Outcome};
use init::system::{RpcDaemons, SysMounter, BOOTCTLD_SOCK, REBOOTD_SOCK};
use init::{options, services};
use nx_contract::markers::{self, init as m};
use nx_contract::NextBoot;
use nx_guest::efivar::LoaderVars;
use nx_guest::marker::show;
use nx_guest::pid1;
use nx_guest::state;
use nx_guest::supervisor::Supervisor;
use nx_guest::sys::Shutdown;
use std::path::Path;

const P: &str = "init";

fn main() {
    show(&m::start());
    let early = pid1::early(P);
    show(&markers::pid1::modules_loaded(P, early.modules));
    let stamp = Path::new("/").join(nx_contract::loader::INITRD_VERSION_FILE);
    if let Ok(Some(v)) = nx_guest::bounded::read_string_opt(&stamp, 128) {
        let v: String = v
            .trim()
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        show(&m::initramfs_version(v));
    }
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
    // The bootloader chose the slot; its rootfs holds the userspace, so it is mounted first.
    let vars = LoaderVars::system();
    let booted = early
        .cmdline
        .get(nx_contract::loader::SLOT_OPTION)
        .and_then(Slot::parse)
        .map(|slot| boot::Booted {
            slot,
            counted: vars
                .read_string(nx_contract::loader::LOADER_BOOT_COUNT_PATH)
                .ok()
                .flatten()
                .is_some(),
        });
    // The trust store: a slot is booted only when a trusted key signed its manifest (the
    // dm-verity root hash comes from it). Unreadable store: no slot is trusted (fail closed).
    let trust = early.state_dev.as_ref().map(|_| {
        nx_guest::trust::load(state_root).unwrap_or_else(|e| {
            show(&m::error(format_args!("trust store unusable: {e}")));
            proto::trust::TrustPolicy::unusable(e.to_string())
        })
    });
    let mut mounter = SysMounter {
        trust,
        ..SysMounter::default()
    };
    let mounted = boot::mount_booted(&mut mounter, booted, &mut |l| show(l));
    let mut sup = Supervisor::new(P);
    let bin_dir = match &mounted {
        Ok((_, m)) => m.mountpoint.join("bin"),
        Err(_) => std::path::PathBuf::from("/bin"),
    };
    for svc in services(&early.cmdline, &bin_dir, &|p| Path::new(p).exists()) {
        sup.add(svc);
    }
    sup.start_due();
    let names = sup.names();
    show(&m::started(&names));
    show(&m::services_ready());

    // Defence in depth: with a factory wipe pending, no slot is confirmed (recovery wipes).
    let wipe = early
        .state_dev
        .as_ref()
        .and_then(|_| boot::wipe_pending(state_root));
    let outcome = match mounted {
        Err(o) => o,
        Ok((b, mounted)) => {
            match RpcDaemons::new(Path::new(BOOTCTLD_SOCK), Path::new(REBOOTD_SOCK))
                .map(|d| d.with_state(early.state_dev.as_ref().map(|_| state_root)))
            {
                Ok(mut daemons) => match &wipe {
                    Some(why) => boot::refuse_for_wipe(&mut daemons, why, &mut |line| show(line)),
                    None => boot::after_mount(
                        &mut daemons,
                        b,
                        &mounted,
                        options(&early.cmdline),
                        &mut |line| show(line),
                    ),
                },
                Err(e) => {
                    show(&m::no_bootctld(&e));
                    Outcome::Degraded { why: e }
                }
            }
        }
    };
    if let Outcome::Reset { recovery } = outcome {
        if recovery {
            if let Err(e) = vars.write_string(
                nx_contract::loader::LOADER_ENTRY_ONESHOT,
                &format!("{}.conf", nx_contract::loader::RECOVERY_ENTRY_ID),
            ) {
                show(&m::oneshot_failed(e));
            }
        }
        pid1::finish(P, Shutdown::Reboot);
    }
    match &outcome {
        Outcome::Rebooting { target } => {
            show(&m::waiting_for_reboot(target));
        }
        Outcome::Reset { .. } | Outcome::Up { .. } | Outcome::Degraded { .. } => {
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
