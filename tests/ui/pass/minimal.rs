use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service worker {
        start: "sleep infinity",
    }
};

fn main() {
    // A `const` is a fresh value at each use: bind it once to borrow from it.
    let home = &HOME;
    let worker = &home.services()[0];
    assert_eq!(worker.name(), "worker");
    assert_eq!(worker.port(), None);
    assert_eq!(worker.health(), Health::None);
    assert_eq!(worker.restart(), RestartPolicy::OnFailure(5));
    assert_eq!(worker.grace(), std::time::Duration::from_secs(10));
    assert!(home.nodes().is_empty());
    assert!(home.validate().is_ok());
}
