//! Prints the KubeControllerManager CRD as YAML (committed under manifests/base/crd.yaml).
use kube::CustomResourceExt;

fn main() {
    print!("{}", serde_yaml::to_string(&kcm_operator::api::KubeControllerManager::crd()).expect("CRD serializes"));
}
