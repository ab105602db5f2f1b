//! Prints the CRDs (KubeControllerManager, KcmNode) as YAML (committed as manifests/base/crd.yaml).
use kube::CustomResourceExt;

fn main() {
    let crds = [kcm_operator::api::KubeControllerManager::crd(), kcm_operator::api::KcmNode::crd()];
    let docs: Vec<String> = crds.iter().map(|c| serde_yaml::to_string(c).expect("CRD serializes")).collect();
    print!("{}", docs.join("---\n"));
}
