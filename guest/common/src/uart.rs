//! The guest's flashing UART (`nx_contract::ports::UART`, `/dev/ttyS1`): whether it is real
//! hardware, and opening it as a raw byte line.
//!
//! The 8250 driver registers four runtime ports whether or not the hardware has them; a port
//! with no UART behind it reports type 0 (`PORT_UNKNOWN`) in `/sys/class/tty/ttySN/type` and
//! cannot be opened. A UART is a lossy line (no flow control: receive-FIFO overruns drop
//! bytes), made reliable only by the protocol's CRC and retransmission.

use crate::{bounded, Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Where the kernel lists tty devices.
pub const SYS_CLASS_TTY: &str = "/sys/class/tty";

/// Whether `/sys/class/tty/<name>/type` (under `sys_dir`) names a real UART (a nonzero
/// serial_core port type). `dev` is a `/dev/ttyS<N>` path; anything else is not a UART.
pub fn present_in(sys_dir: &Path, dev: &Path) -> bool {
    let Some(name) = dev.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if !is_tty_s_name(name) {
        return false;
    }
    match bounded::read_string_opt(&sys_dir.join(name).join("type"), 32) {
        Ok(Some(t)) => t.trim().parse::<u32>().is_ok_and(|n| n != 0),
        _ => false,
    }
}

/// [`present_in`] the real sysfs.
pub fn present(dev: &Path) -> bool {
    present_in(Path::new(SYS_CLASS_TTY), dev)
}

/// `ttyS<digits>`: the only device names taken as UARTs.
pub fn is_tty_s_name(s: &str) -> bool {
    s.strip_prefix("ttyS")
        .is_some_and(|d| !d.is_empty() && d.len() <= 3 && d.bytes().all(|c| c.is_ascii_digit()))
}

/// Open `dev` read-write, non-blocking, never as a controlling terminal, and make it a raw
/// 8N1 line at 115200 baud: `cfmakeraw` (no echo, no line discipline, no CR/LF mapping), no
/// software or hardware flow control, `CLOCAL | CREAD` (ignore modem lines: a read never sees
/// a hangup), `VMIN = 1, VTIME = 0` (with `O_NONBLOCK` an empty read is `EAGAIN`, never a
/// 0 that would read as end of file). Bytes that arrived before are flushed.
pub fn open_raw(dev: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(dev)
        .map_err(|e| Error::io("open the UART", dev, e))?;
    let fd = file.as_raw_fd();
    let sys = |what: &str, rc: libc::c_int| -> Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::Sys {
                what: format!("{what} {}", dev.display()),
                source: std::io::Error::last_os_error(),
            })
        }
    };
    // SAFETY: a zeroed termios is a valid value to be filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the duration of these calls; `t` is a valid termios.
    unsafe {
        sys("tcgetattr", libc::tcgetattr(fd, &mut t))?;
        libc::cfmakeraw(&mut t);
        t.c_iflag &= !(libc::IXON | libc::IXOFF | libc::IXANY);
        t.c_cflag &= !libc::CRTSCTS;
        t.c_cflag |= libc::CLOCAL | libc::CREAD;
        // VMIN = 1: an empty non-blocking read fails with EAGAIN (with VMIN = 0 it returns 0,
        // which reads as end of file).
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        // The speed lives in CBAUD (cfsetspeed(3) is not linkable in the static guest).
        t.c_cflag = (t.c_cflag & !libc::CBAUD) | libc::B115200;
        sys("tcsetattr", libc::tcsetattr(fd, libc::TCSANOW, &t))?;
        sys("tcflush", libc::tcflush(fd, libc::TCIOFLUSH))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_tty_s_ports_are_present() {
        let sys = tempfile::tempdir().unwrap();
        for (name, ty) in [("ttyS1", "4\n"), ("ttyS2", "0\n"), ("evil", "4\n")] {
            std::fs::create_dir_all(sys.path().join(name)).unwrap();
            std::fs::write(sys.path().join(name).join("type"), ty).unwrap();
        }
        assert!(present_in(sys.path(), Path::new("/dev/ttyS1")));
        assert!(!present_in(sys.path(), Path::new("/dev/ttyS2")));
        assert!(!present_in(sys.path(), Path::new("/dev/ttyS3")));
        assert!(!present_in(sys.path(), Path::new("/dev/evil")));
        assert!(is_tty_s_name("ttyS0"));
        assert!(!is_tty_s_name("ttyS"));
        assert!(!is_tty_s_name("ttyS1/../x"));
    }

    #[test]
    fn a_pty_opens_as_a_raw_line() {
        // A pseudo-terminal takes the same termios calls as a UART.
        // SAFETY: plain libc calls on a descriptor we own.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        assert!(master >= 0);
        // SAFETY: as above.
        unsafe {
            assert_eq!(libc::grantpt(master), 0);
            assert_eq!(libc::unlockpt(master), 0);
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` is a writable buffer of the given length.
        assert_eq!(
            unsafe { libc::ptsname_r(master, name.as_mut_ptr(), name.len()) },
            0
        );
        // SAFETY: ptsname_r wrote a NUL-terminated string.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_str()
            .unwrap()
            .to_string();
        let f = open_raw(Path::new(&path)).unwrap();
        // SAFETY: as above.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) }, 0);
        assert_eq!(t.c_lflag & libc::ECHO, 0);
        assert_eq!(t.c_lflag & libc::ICANON, 0);
        assert_ne!(t.c_cflag & libc::CLOCAL, 0);
        assert_eq!(t.c_iflag & libc::IXON, 0);
        // Nothing to read is EAGAIN, not a 0 that would read as end of file.
        use std::io::Read;
        let mut b = [0u8; 8];
        let err = (&f).read(&mut b).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
        // SAFETY: closing the descriptor we opened.
        unsafe { libc::close(master) };
    }
}
