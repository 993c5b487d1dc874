//! `runewarp man`: the manual pages, rendered from the command-line
//! definition so that every subcommand and flag is described exactly as
//! `--help` describes it. The main page adds the sections clap cannot know:
//! FILES, ENVIRONMENT, EXIT STATUS and SEE ALSO.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::Cli;
use crate::fsutil;

/// Mode of written pages: world-readable documentation.
const PAGE_MODE: u32 = 0o644;

/// The sections of runewarp(1) that describe the program as a whole.
const MAIN_EXTRA: &str = r#".SH FILES
.TP
\fI$XDG_CONFIG_HOME/runewarp/config.toml\fR
The configuration file read when \fB\-c\fR is not given
(\fI~/.config/runewarp/config.toml\fR without XDG_CONFIG_HOME).
Relative paths inside it resolve against its directory.
.TP
\fI$XDG_DATA_HOME/runewarp/server/\fR
The Server \fBcert\-dir\fR: \fIserver.crt\fR, \fIserver.key\fR,
\fIserver\-ca.crt\fR and \fIstate/server\-ca.key\fR.
.TP
\fI$XDG_DATA_HOME/runewarp/client/identity/\fR
The Client \fBidentity\-dir\fR: \fIclient.crt\fR, \fIclient.key\fR and
\fIclient\-identity.txt\fR (the pin).
.TP
\fI$XDG_DATA_HOME/runewarp/client/public\-certs/\fR
The Client \fBpublic\-cert\-dir\fR for terminate Services:
\fIpublic\-ca.crt\fR, \fIstate/public\-ca.key\fR and
\fI<hostname>/public.crt\fR, \fI<hostname>/public.key\fR.
.TP
\fI$XDG_STATE_HOME/runewarp/{server,client}/acme/\fR
ACME account and certificate cache (private, mode 0700).
.TP
\fI$XDG_RUNTIME_DIR/runewarp/{server,client}.sock\fR
The control socket (mode 0600) that \fBstatus\fR reads; without
XDG_RUNTIME_DIR, \fI$XDG_STATE_HOME/runewarp/{server,client}.sock\fR.
Set with \fBcontrol\-socket\fR.
.SH ENVIRONMENT
.TP
\fBRUNEWARP_SERVER_HOSTNAME\fR
The Server hostname, when neither \fB\-\-hostname\fR nor
\fBserver.hostname\fR gives it.
.TP
\fBRUNEWARP_LOG\fR
A tracing filter directive (e.g. \fIdebug\fR or \fIrunewarp=debug\fR) that
overrides \fBlog\-level\fR.
.TP
\fBRUNEWARP_RESOLVE\fR
\fIname=ip[,name=ip...]\fR: dial these addresses for \fBserver\-address\fR
names instead of resolving them (tests and split-horizon set-ups).
.TP
\fBTOKIO_WORKER_THREADS\fR
Worker threads of a Server or Client process (default: half the CPUs, at
least one).
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd for \fIType=notify\fR units: READY=1 and STOPPING=1 are sent
there.
.TP
\fBXDG_CONFIG_HOME\fR, \fBXDG_DATA_HOME\fR, \fBXDG_STATE_HOME\fR
Where the defaults above live.
.SH EXIT STATUS
.TP
\fB0\fR
An orderly stop (after a signal, or a command that succeeded).
.TP
\fB1\fR
A runtime failure: a listener could not bind, material could not be read,
an I/O error.
.TP
\fB2\fR
A configuration or usage error; nothing was started. systemd units should
not restart on it.
.SH SEE ALSO
The documentation in the source tree: \fIdocs/configuration.md\fR,
\fIdocs/operations.md\fR, \fIdocs/nixos.md\fR.
"#;

/// The whole command tree, as the pages describe it.
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// runewarp(1) with its extra sections.
pub(crate) fn render_main(w: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(command());
    let mut page = Vec::new();
    man.render(&mut page)?;
    w.write_all(&page)?;
    w.write_all(MAIN_EXTRA.as_bytes())
}

/// Every page (runewarp(1) and one per subcommand, e.g.
/// runewarp-server-cert-init(1)) into `dir`, each written atomically.
/// Returns the paths written.
pub fn write_all(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fsutil::ensure_dir(dir, 0o755)?;
    let mut written = Vec::new();
    let mut main = Vec::new();
    render_main(&mut main)?;
    let path = dir.join("runewarp.1");
    fsutil::write_atomic(&path, &main, PAGE_MODE)?;
    written.push(path);
    let root = command();
    let mut stack: Vec<clap::Command> = root.get_subcommands().cloned().collect();
    while let Some(cmd) = stack.pop() {
        if cmd.is_hide_set() {
            continue;
        }
        stack.extend(cmd.get_subcommands().cloned());
        let man = clap_mangen::Man::new(cmd);
        let mut page = Vec::new();
        man.render(&mut page)?;
        page.extend_from_slice(b".SH SEE ALSO\n\\fBrunewarp\\fR(1)\n");
        let path = dir.join(man.get_filename());
        fsutil::write_atomic(&path, &page, PAGE_MODE)?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_page_has_the_sections_an_operator_looks_for() {
        let mut out = Vec::new();
        render_main(&mut out).expect("render");
        let page = String::from_utf8(out).expect("utf-8");
        for section in [
            ".SH NAME",
            ".SH SYNOPSIS",
            ".SH SUBCOMMANDS",
            ".SH FILES",
            ".SH ENVIRONMENT",
            ".SH EXIT STATUS",
        ] {
            assert!(page.contains(section), "{section} missing");
        }
    }

    #[test]
    fn every_page_the_main_page_refers_to_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write_all(dir.path()).expect("write");
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect();
        for page in [
            "runewarp.1",
            "runewarp-server.1",
            "runewarp-client.1",
            "runewarp-server-cert-init.1",
            "runewarp-client-identity-show.1",
            "runewarp-config.1",
        ] {
            assert!(names.iter().any(|n| n == page), "{page} not in {names:?}");
        }
        // Every page named in a SUBCOMMANDS section exists.
        for path in &written {
            let text = std::fs::read_to_string(path).expect("read");
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("runewarp\\-")
                    && let Some((name, _)) = rest.split_once('(')
                    && !name.contains(' ')
                {
                    let file = format!("runewarp-{}.1", name.replace("\\-", "-"));
                    assert!(names.contains(&file), "{} refers to {file}", path.display());
                }
            }
        }
    }

    #[test]
    fn every_flag_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_hide_set() && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "runewarp", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }
}
