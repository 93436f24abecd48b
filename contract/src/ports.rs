//! Virtio-serial ports: the name the guest finds in `/sys/class/virtio-ports/*/name` and the
//! host socket QEMU's chardev listens on (under the runner's run directory, `build/qemu/`).

/// One virtio-serial port of the guest and its host-side socket file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// The virtserialport name (`com.nexus.flash`).
    pub name: &'static str,
    /// The host socket file name in the run directory (`flash.sock`).
    pub socket: &'static str,
}

/// flashd's port.
pub const FLASH: PortSpec = PortSpec {
    name: "com.nexus.flash",
    socket: "flash.sock",
};
/// rebootd's port (capnp-rpc).
pub const REBOOT: PortSpec = PortSpec {
    name: "com.nexus.reboot",
    socket: "reboot.sock",
};
/// bootctld's port (capnp-rpc).
pub const BOOTCTL: PortSpec = PortSpec {
    name: "com.nexus.bootctl",
    socket: "bootctl.sock",
};
/// The benchmark's raw-copy port (`rawrecv`), only on bench guests.
pub const BENCH: PortSpec = PortSpec {
    name: "com.nexus.bench",
    socket: "bench.sock",
};

/// The ports every guest boot has, in QEMU order (flash first: `/dev/vport0p1`).
pub const STANDARD: [PortSpec; 3] = [FLASH, REBOOT, BOOTCTL];

/// The guest's second 16550 UART and the host socket QEMU's chardev for it listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UartSpec {
    /// The guest device (`/dev/ttyS1`; `ttyS0` is the console).
    pub device: &'static str,
    /// The host socket file name in the run directory (`uart.sock`).
    pub socket: &'static str,
}

/// The flashing UART every guest boot has: a lossy line (no flow control, FIFO overruns
/// drop bytes), made reliable only by the protocol's CRC and retransmission.
pub const UART: UartSpec = UartSpec {
    device: "/dev/ttyS1",
    socket: "uart.sock",
};

/// The host run directory of the standard guest, relative to the project root.
pub const HOST_RUN_DIR: &str = "build/qemu";

/// The port spec with this guest name, if it is one of ours.
pub fn by_name(name: &str) -> Option<PortSpec> {
    [FLASH, REBOOT, BOOTCTL, BENCH]
        .into_iter()
        .find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sockets_are_distinct() {
        let all = [FLASH, REBOOT, BOOTCTL, BENCH];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.socket, b.socket);
            }
        }
        for p in all {
            assert_ne!(p.socket, UART.socket);
        }
        assert_eq!(by_name("com.nexus.reboot"), Some(REBOOT));
        assert_eq!(by_name("com.nexus.none"), None);
    }
}
