//! Where the kubelet on this master reads static pods from: its `--pod-manifest-path`
//! flag, or `staticPodPath` in the file its `--config` flag names (kubeadm:
//! `/var/lib/kubelet/config.yaml`). Found through the host's `/proc` (hostPID).

use std::path::Path;

/// What a kubelet command line says about static pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeletArgs {
    pub config: Option<String>,
    pub pod_manifest_path: Option<String>,
}

/// Reads `--config` and `--pod-manifest-path` (as `--f=v` or `--f v`) from argv.
pub fn parse_args(argv: &[String]) -> KubeletArgs {
    let mut out = KubeletArgs::default();
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let (name, value) = match a.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        let slot = match name {
            "--config" => &mut out.config,
            "--pod-manifest-path" => &mut out.pod_manifest_path,
            _ => continue,
        };
        *slot = value.or_else(|| it.next().cloned()).filter(|v| !v.is_empty());
    }
    out
}

/// `staticPodPath` of a KubeletConfiguration (YAML or JSON); `None` when unset or empty.
pub fn static_pod_path(config: &str) -> Result<Option<String>, String> {
    let v: serde_yaml::Value = serde_yaml::from_str(config).map_err(|e| format!("not a KubeletConfiguration: {e}"))?;
    Ok(v.get("staticPodPath").and_then(|p| p.as_str()).map(str::to_string).filter(|p| !p.is_empty()))
}

/// The kubelet's static pod directory on this host, or why there is none.
pub fn static_pod_dir(host_root: &Path) -> Result<String, String> {
    let proc_root = host_root.join("proc");
    let entries = std::fs::read_dir(&proc_root).map_err(|e| format!("reading {}: {e}", proc_root.display()))?;
    let argv = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect::<Vec<_>>())
        .find(|argv| argv.first().is_some_and(|a0| Path::new(a0).file_name().is_some_and(|n| n == "kubelet")))
        .ok_or_else(|| "no kubelet process on this master".to_string())?;
    let args = parse_args(&argv);
    if let Some(p) = args.pod_manifest_path {
        return Ok(p);
    }
    let config = args.config.unwrap_or_else(|| "/var/lib/kubelet/config.yaml".into());
    let text = std::fs::read_to_string(host_root.join(config.trim_start_matches('/'))).map_err(|e| format!("reading the kubelet's config {config}: {e}"))?;
    static_pod_path(&text)?.ok_or_else(|| format!("the kubelet has no static pod path (no staticPodPath in {config}, no --pod-manifest-path)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn flags_in_both_spellings() {
        assert_eq!(
            parse_args(&argv("/usr/bin/kubelet --kubeconfig=/etc/kubernetes/kubelet.conf --config=/var/lib/kubelet/config.yaml")).config.as_deref(),
            Some("/var/lib/kubelet/config.yaml")
        );
        let a = parse_args(&argv("kubelet --config /k/c.yaml --pod-manifest-path /etc/m"));
        assert_eq!(a, KubeletArgs { config: Some("/k/c.yaml".into()), pod_manifest_path: Some("/etc/m".into()) });
        assert_eq!(parse_args(&argv("kubelet --v=2")), KubeletArgs::default());
    }

    #[test]
    fn static_pod_path_from_config() {
        assert_eq!(
            static_pod_path("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nstaticPodPath: /etc/kubernetes/manifests\n")
                .unwrap()
                .as_deref(),
            Some("/etc/kubernetes/manifests")
        );
        assert_eq!(static_pod_path("kind: KubeletConfiguration\n").unwrap(), None);
        assert_eq!(static_pod_path("staticPodPath: \"\"\n").unwrap(), None);
        assert!(static_pod_path(": : :").is_err());
    }

    #[test]
    fn found_through_proc_and_the_config_file() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("proc/1")).unwrap();
        std::fs::write(r.join("proc/1/cmdline"), b"/sbin/init\0").unwrap();
        assert_eq!(static_pod_dir(r).unwrap_err(), "no kubelet process on this master");
        std::fs::create_dir_all(r.join("proc/77")).unwrap();
        std::fs::write(r.join("proc/77/cmdline"), b"/usr/bin/kubelet\0--config=/var/lib/kubelet/config.yaml\0").unwrap();
        assert!(static_pod_dir(r).unwrap_err().contains("reading the kubelet's config"));
        std::fs::create_dir_all(r.join("var/lib/kubelet")).unwrap();
        std::fs::write(r.join("var/lib/kubelet/config.yaml"), "kind: KubeletConfiguration\n").unwrap();
        assert!(static_pod_dir(r).unwrap_err().contains("no static pod path"));
        std::fs::write(r.join("var/lib/kubelet/config.yaml"), "staticPodPath: /etc/kubernetes/manifests\n").unwrap();
        assert_eq!(static_pod_dir(r).unwrap(), "/etc/kubernetes/manifests");
    }
}
