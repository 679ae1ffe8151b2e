//! Facts about other processes, read from `/proc`.

/// Whether process `pid` has exited (gone, or a zombie not yet reaped).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
        Err(_) => true,
    }
}

/// Times the calling thread has blocked so far (voluntary context
/// switches): each is a wake-up it then waited for.
pub fn thread_sleeps() -> u64 {
    // SAFETY: an all-zero rusage is valid, and getrusage fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD and a valid rusage to write into.
    match unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } {
        0 => u64::try_from(usage.ru_nvcsw).unwrap_or(0),
        _ => 0,
    }
}

/// CPU time all of process `pid`'s threads have run so far (the kernel's
/// per-task schedstat), faults and signal handlers taken in them included.
pub fn cpu_time(pid: i32) -> std::time::Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    let ns: u64 = tasks
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    std::time::Duration::from_nanos(ns)
}

/// [`cpu_time`] of this process.
pub fn own_cpu_time() -> std::time::Duration {
    cpu_time(std::process::id() as i32)
}
