//! A closed stdout (`softalign list --examples | head -1`, `recipe check R | true`) ends the
//! command quietly, killed by SIGPIPE as `ls` is (status 141 in a shell), instead of
//! `println!`'s panic "failed printing to stdout: Broken pipe" (exit 101).
//!
//! The usual fix, SIGPIPE back to its default disposition for the whole process, would also
//! turn every other broken pipe into a silent death: `train`'s pipe to the W&B process and the
//! sockets of data-parallel runs, whose errors must instead be reported (and a training killed
//! without a message, mid-run, is what this project works to avoid). So only the failed print
//! to stdout takes that way out.
use std::panic::PanicHookInfo;

/// Chains a panic hook that recognises std's "failed printing to stdout" for EPIPE.
pub fn quiet_on_closed_stdout() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if is_closed_stdout(info) {
            die_of_sigpipe();
        }
        previous(info)
    }));
}

fn is_closed_stdout(info: &PanicHookInfo<'_>) -> bool {
    let payload = info.payload();
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("");
    // std formats the io::Error with its OS text, which this builds the same way.
    let epipe = std::io::Error::from_raw_os_error(libc::EPIPE).to_string();
    text.starts_with("failed printing to stdout") && text.contains(&epipe)
}

fn die_of_sigpipe() -> ! {
    #[cfg(unix)]
    {
        // Restores SIGPIPE's default action (terminate) and raises it.
        let _ = signal_hook::low_level::emulate_default_handler(signal_hook::consts::SIGPIPE);
    }
    // Not reached on Unix; elsewhere the shell convention for "killed by SIGPIPE".
    std::process::exit(141)
}
