//! Printing to stdout for a command line tool (see [`out!`]).

use std::process::ExitCode;

/// `print!` for a command line tool. When stdout fails (its reader has
/// gone, as in a pipe into `head`, or a full disk), printing stops but the
/// work goes on: a migration half done must still finish or resume its
/// source, and write its JSON report. `main` then ends as the failure asks
/// (by SIGPIPE for a closed pipe, as tools do). SIGPIPE itself stays
/// ignored, so a vanished peer is an error on its socket.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if $crate::out::STDOUT_FAILED.get().is_none() {
            if let Err(e) = write!(std::io::stdout(), $($arg)*) {
                let _ = $crate::out::STDOUT_FAILED.set(e.kind());
            }
        }
    }};
}

macro_rules! outln {
    ($($arg:tt)*) => {{
        out!($($arg)*);
        out!("\n");
    }};
}

/// `eprintln!` that ignores a failed stderr (a closed pipe): the error
/// line is lost, but the exit status and the cleanup before it are not.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The first failure writing to stdout, if any.
pub static STDOUT_FAILED: std::sync::OnceLock<std::io::ErrorKind> = std::sync::OnceLock::new();

/// End as a failed stdout asks, once the work is done.
pub fn stdout_verdict() -> Option<ExitCode> {
    let kind = *STDOUT_FAILED.get()?;
    if kind == std::io::ErrorKind::BrokenPipe {
        // SAFETY: restoring a signal's default action and raising it; the
        // default action of SIGPIPE ends the process.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    errln!("Error: writing to stdout: {}", std::io::Error::from(kind));
    Some(ExitCode::FAILURE)
}
