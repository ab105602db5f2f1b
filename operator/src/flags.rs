//! Which kube-controller-manager flags a given kcm version accepts, and how the seed's
//! flags translate to it. Pure: no I/O.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// `--name=value`, or `--name` alone when `value` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flag {
    pub name: String,
    pub value: Option<String>,
}

impl Flag {
    pub fn new(name: &str, value: impl Into<String>) -> Self {
        Self { name: name.into(), value: Some(value.into()) }
    }
    pub fn bare(name: &str) -> Self {
        Self { name: name.into(), value: None }
    }
    /// The flag as one argument of a systemd `ExecStart=` line (see [`exec_word`]).
    /// A control character in its name or value is refused.
    pub fn render(&self) -> Result<String, UnitValueError> {
        let name = exec_word("flag name", &self.name)?;
        match &self.value {
            None => Ok(format!("--{name}")),
            Some(v) => Ok(format!("--{name}={}", exec_word(&format!("flag --{}", self.name), v)?)),
        }
    }
}

/// A value refused for a master's files: systemd would not read it back as written (or, for
/// a control character, would read more into it: a newline starts a new unit setting).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field} {value:?} is refused: {reason}")]
pub struct UnitValueError {
    /// What the value is: the spec field (`kcm.workingDir`) or the flag (`flag --v`).
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl UnitValueError {
    pub fn new(field: &str, value: &str, reason: impl Into<String>) -> Self {
        Self { field: field.into(), value: value.into(), reason: reason.into() }
    }
}

/// Refuses any control character (C0, DEL, C1) in `value`. In a unit file a newline ends the
/// setting and starts another one (`ExecStartPre=`, run as root); systemd splits on tabs and
/// cuts at NUL.
pub fn refuse_control(field: &str, value: &str) -> Result<(), UnitValueError> {
    match value.chars().find(|c| c.is_control()) {
        Some(c) => {
            Err(UnitValueError::new(field, value, format!("it contains the control character U+{:04X}, which systemd cannot take literally", u32::from(c))))
        }
        None => Ok(()),
    }
}

/// `value` with `%` doubled: systemd expands `%` specifiers (`%n`, `%h`, ...) in the command
/// line and in paths such as `WorkingDirectory=`; `%%` is a literal `%`.
pub fn escape_specifiers(value: &str) -> String {
    value.replace('%', "%%")
}

/// `value` as one word of a systemd command line (systemd.service(5) "Command lines",
/// systemd.syntax(7)) that systemd passes on literally as one argument: `%` doubled
/// (specifiers), `$` doubled (environment variable substitution), and, when it is empty or
/// holds whitespace, quotes or backslashes, double-quoted with `\` and `"` escaped as `\\`
/// and `\"`. A control character is refused: no quoting carries it.
pub fn exec_word(field: &str, value: &str) -> Result<String, UnitValueError> {
    refuse_control(field, value)?;
    let word = escape_specifiers(value).replace('$', "$$");
    if word.is_empty() || word.chars().any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\')) {
        Ok(format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\"")))
    } else {
        Ok(word)
    }
}

/// A kube-controller-manager version, e.g. from `kube-controller-manager --version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KcmVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KcmVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self { major, minor, patch }
    }
    fn at_least(self, minor: u32) -> bool {
        self.major > 1 || (self.major == 1 && self.minor >= minor)
    }
}

impl fmt::Display for KcmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    #[error("cannot read a kube-controller-manager version from {0:?}")]
    BadVersion(String),
    #[error("flag --{flag} cannot be placed on kube-controller-manager {version}: {reason}")]
    Refused { flag: String, version: KcmVersion, reason: String },
}

impl FromStr for KcmVersion {
    type Err = FlagError;
    /// Accepts `Kubernetes v1.33.13`, `v1.26.0-rc.1`, `1.23.4`.
    fn from_str(s: &str) -> Result<Self, FlagError> {
        let bad = || FlagError::BadVersion(s.trim().to_string());
        let word = s.split_whitespace().find(|w| w.trim_start_matches('v').starts_with(|c: char| c.is_ascii_digit())).ok_or_else(bad)?;
        let core = word.trim_start_matches('v').split(['-', '+']).next().ok_or_else(bad)?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>());
        let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else { return Err(bad()) };
        let patch = match parts.next() {
            Some(Ok(p)) => p,
            None => 0,
            Some(Err(_)) => return Err(bad()),
        };
        Ok(Self { major, minor, patch })
    }
}

/// The result of fitting a flag list to one kcm version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translated {
    pub flags: Vec<Flag>,
    /// One line per flag dropped or renamed, for the node's status.
    pub warnings: Vec<String>,
}

/// The klog flags kcm 1.26 removed (logs go to stderr, i.e. the journal, unconditionally).
const KLOG_REMOVED_1_26: &[&str] = &[
    "add-dir-header",
    "alsologtostderr",
    "log-backtrace-at",
    "log-dir",
    "log-file",
    "log-file-max-size",
    "logtostderr",
    "one-output",
    "skip-headers",
    "skip-log-headers",
    "stderrthreshold",
];

/// Every flag name [`translate`] has a rule for (the rest are kept as they are), so that
/// the rules can be checked against a real binary's `--help`.
pub fn ruled_flags() -> Vec<&'static str> {
    let mut names =
        vec!["port", "address", "experimental-cluster-signing-duration", "cluster-signing-duration", "pod-eviction-timeout", "concurrent-service-syncs"];
    names.extend_from_slice(KLOG_REMOVED_1_26);
    names
}

enum Fate {
    Keep,
    Rename(&'static str),
    Drop(String),
    Refuse(String),
}

fn fate(flag: &Flag, v: KcmVersion) -> Fate {
    let value = flag.value.as_deref();
    match flag.name.as_str() {
        "port" if v.at_least(24) => match value {
            Some("0") => Fate::Drop("--port=0 dropped: the insecure port it disabled was removed in 1.24".into()),
            _ => Fate::Refuse("the insecure port was removed in 1.24; serve on --secure-port".into()),
        },
        "address" if v.at_least(24) => Fate::Drop("--address dropped: the insecure port was removed in 1.24".into()),
        "experimental-cluster-signing-duration" if v.at_least(19) => Fate::Rename("cluster-signing-duration"),
        "cluster-signing-duration" if !v.at_least(19) => Fate::Rename("experimental-cluster-signing-duration"),
        "pod-eviction-timeout" if v.at_least(27) => {
            Fate::Drop("--pod-eviction-timeout dropped: removed in 1.27; eviction follows taint tolerations (default 300s)".into())
        }
        "concurrent-service-syncs" if v.at_least(37) => Fate::Drop(
            "--concurrent-service-syncs dropped: removed in 1.37; it was a no-op since 1.31 (the service controller runs in the cloud controller manager)"
                .into(),
        ),
        name if v.at_least(26) && KLOG_REMOVED_1_26.contains(&name) => {
            Fate::Drop(format!("--{name} dropped: klog flags were removed in 1.26; kcm logs to stderr (the journal)"))
        }
        _ => Fate::Keep,
    }
}

/// Fits `flags` to kcm `version`: renames what has a successor, drops what is gone (with
/// a warning), and refuses what cannot be placed. When `accepted` (the flag names the
/// binary's `--help` lists) is given, any flag outside it is refused too.
pub fn translate(flags: &[Flag], version: KcmVersion, accepted: Option<&BTreeSet<String>>) -> Result<Translated, FlagError> {
    let mut out = Translated { flags: Vec::with_capacity(flags.len()), warnings: Vec::new() };
    for flag in flags {
        let placed = match fate(flag, version) {
            Fate::Keep => flag.clone(),
            Fate::Rename(to) => {
                out.warnings.push(format!("--{} renamed to --{to} for kube-controller-manager {version}", flag.name));
                Flag { name: to.into(), value: flag.value.clone() }
            }
            Fate::Drop(why) => {
                out.warnings.push(why);
                continue;
            }
            Fate::Refuse(reason) => return Err(FlagError::Refused { flag: flag.name.clone(), version, reason }),
        };
        if let Some(accepted) = accepted {
            if !accepted.contains(&placed.name) {
                return Err(FlagError::Refused { flag: placed.name, version, reason: "the binary's --help does not list it".into() });
            }
        }
        out.flags.push(placed);
    }
    Ok(out)
}

/// Flag names listed by `kube-controller-manager --help`.
pub fn parse_help(help: &str) -> BTreeSet<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = match line.strip_prefix('-') {
                Some(rest) if !rest.starts_with('-') => rest.split_once(", ").map(|(_, long)| long)?,
                _ => line,
            };
            let name = line.strip_prefix("--")?;
            let name: String = name.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(t: &Translated) -> Vec<&str> {
        t.flags.iter().map(|f| f.name.as_str()).collect()
    }

    fn seedish() -> Vec<Flag> {
        vec![
            Flag::bare("profiling"),
            Flag::new("port", "0"),
            Flag::new("experimental-cluster-signing-duration", "8760h"),
            Flag::new("pod-eviction-timeout", "6m"),
            Flag::new("logtostderr", "true"),
            Flag::new("v", "2"),
        ]
    }

    #[test]
    fn version_parses_from_binary_output() {
        assert_eq!("Kubernetes v1.33.13\n".parse::<KcmVersion>().unwrap(), KcmVersion::new(1, 33, 13));
        assert_eq!("v1.26.0-rc.1".parse::<KcmVersion>().unwrap(), KcmVersion::new(1, 26, 0));
        assert_eq!("1.23".parse::<KcmVersion>().unwrap(), KcmVersion::new(1, 23, 0));
        assert!(matches!("Kubernetes".parse::<KcmVersion>(), Err(FlagError::BadVersion(_))));
        assert!(matches!("".parse::<KcmVersion>(), Err(FlagError::BadVersion(_))));
        assert!(matches!("vX.1".parse::<KcmVersion>(), Err(FlagError::BadVersion(_))));
    }

    #[test]
    fn kcm_1_23_keeps_insecure_port_and_klog_renames_signing_duration() {
        let t = translate(&seedish(), KcmVersion::new(1, 23, 17), None).unwrap();
        assert_eq!(names(&t), ["profiling", "port", "cluster-signing-duration", "pod-eviction-timeout", "logtostderr", "v"]);
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert!(t.warnings[0].contains("renamed to --cluster-signing-duration"));
    }

    #[test]
    fn kcm_1_26_drops_port_and_klog_keeps_eviction_timeout() {
        let t = translate(&seedish(), KcmVersion::new(1, 26, 15), None).unwrap();
        assert_eq!(names(&t), ["profiling", "cluster-signing-duration", "pod-eviction-timeout", "v"]);
        assert_eq!(t.warnings.len(), 3, "{:?}", t.warnings);
        assert!(t.warnings.iter().any(|w| w.starts_with("--port=0 dropped")));
        assert!(t.warnings.iter().any(|w| w.starts_with("--logtostderr dropped")));
    }

    #[test]
    fn kcm_1_33_drops_eviction_timeout_too() {
        let t = translate(&seedish(), KcmVersion::new(1, 33, 13), None).unwrap();
        assert_eq!(names(&t), ["profiling", "cluster-signing-duration", "v"]);
        assert_eq!(t.flags[1].value.as_deref(), Some("8760h"));
        assert!(t.warnings.iter().any(|w| w.starts_with("--pod-eviction-timeout dropped")));
    }

    #[test]
    fn kcm_1_37_drops_concurrent_service_syncs() {
        let flags = [Flag::new("concurrent-service-syncs", "2"), Flag::new("v", "2")];
        let t = translate(&flags, KcmVersion::new(1, 36, 1), None).unwrap();
        assert_eq!(names(&t), ["concurrent-service-syncs", "v"]);
        let t = translate(&flags, KcmVersion::new(1, 37, 2), None).unwrap();
        assert_eq!(names(&t), ["v"]);
        assert!(t.warnings[0].starts_with("--concurrent-service-syncs dropped: removed in 1.37"), "{:?}", t.warnings);
    }

    #[test]
    fn old_kcm_gets_experimental_name() {
        let t = translate(&[Flag::new("cluster-signing-duration", "1h")], KcmVersion::new(1, 18, 0), None).unwrap();
        assert_eq!(names(&t), ["experimental-cluster-signing-duration"]);
    }

    #[test]
    fn nonzero_insecure_port_is_refused_on_current_kcm() {
        let err = translate(&[Flag::new("port", "10252")], KcmVersion::new(1, 33, 0), None).unwrap_err();
        assert!(matches!(&err, FlagError::Refused { flag, .. } if flag == "port"), "{err}");
        assert!(translate(&[Flag::new("port", "10252")], KcmVersion::new(1, 23, 0), None).is_ok());
    }

    #[test]
    fn flags_outside_help_are_refused() {
        let accepted: BTreeSet<String> = ["profiling", "v", "cluster-signing-duration"].iter().map(|s| s.to_string()).collect();
        let t = translate(&seedish(), KcmVersion::new(1, 33, 0), Some(&accepted)).unwrap();
        assert_eq!(names(&t), ["profiling", "cluster-signing-duration", "v"]);
        let err = translate(&[Flag::new("no-such-flag", "1")], KcmVersion::new(1, 33, 0), Some(&accepted)).unwrap_err();
        assert!(err.to_string().contains("--no-such-flag"), "{err}");
    }

    #[test]
    fn help_output_is_parsed() {
        let help = "Usage:\n  kube-controller-manager [flags]\n\nGeneric flags:\n\n      --allocate-node-cidrs                 Should CIDRs...\n      --bind-address ip                     The IP address\n  -h, --help                                help for kube-controller-manager\n      --v Level                             number\n      --vmodule pattern=N,...               comma\n";
        let got = parse_help(help);
        let want: BTreeSet<String> = ["allocate-node-cidrs", "bind-address", "help", "v", "vmodule"].iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want);
    }

    fn rendered(f: Flag) -> String {
        f.render().unwrap()
    }

    #[test]
    fn render_quotes_what_systemd_would_split() {
        assert_eq!(rendered(Flag::new("requestheader-allowed-names", "")), "--requestheader-allowed-names=\"\"");
        assert_eq!(rendered(Flag::new("x", "a b")), "--x=\"a b\"");
        assert_eq!(rendered(Flag::bare("profiling")), "--profiling");
        assert_eq!(rendered(Flag::new("controllers", "*,bootstrapsigner")), "--controllers=*,bootstrapsigner");
    }

    #[test]
    fn render_escapes_what_systemd_would_expand_or_unquote() {
        // Specifiers: `%%` is a literal `%`.
        assert_eq!(rendered(Flag::new("x", "50%n")), "--x=50%%n");
        // Environment variables: `$$` is a literal `$`.
        assert_eq!(rendered(Flag::new("x", "$HOME${PATH}")), "--x=$$HOME$${PATH}");
        // Backslashes and quotes: one double-quoted word, `\\` and `\"` inside.
        assert_eq!(rendered(Flag::new("x", r"C:\dir")), r#"--x="C:\\dir""#);
        assert_eq!(rendered(Flag::new("x", r#"say "hi""#)), r#"--x="say \"hi\"""#);
        assert_eq!(rendered(Flag::new("x", "it's")), r#"--x="it's""#);
        assert_eq!(rendered(Flag::new("x", r#"%$\""#)), r#"--x="%%$$\\\"""#);
        // A trailing backslash stays inside the quotes: not a line continuation.
        assert_eq!(rendered(Flag::new("x", r"a\")), r#"--x="a\\""#);
        assert_eq!(rendered(Flag::new("x%", "1")), "--x%%=1");
    }

    #[test]
    fn render_refuses_control_characters_in_name_and_value() {
        for c in ['\n', '\r', '\0', '\t', '\x1b', '\x7f', '\u{85}'] {
            let err = Flag::new("x", format!("/a{c}ExecStartPre=/bin/sh")).render().unwrap_err();
            assert_eq!(err.field, "flag --x", "{err}");
            assert!(err.to_string().contains(&format!("U+{:04X}", u32::from(c))), "{err}");
            let err = Flag::new(&format!("x{c}y"), "1").render().unwrap_err();
            assert_eq!(err.field, "flag name", "{err}");
            let err = Flag::bare(&format!("x{c}")).render().unwrap_err();
            assert_eq!(err.field, "flag name", "{err}");
        }
    }
}
