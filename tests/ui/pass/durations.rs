use std::time::Duration;

use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service a { start: "a", grace: 500ms }
    service b { start: "b", grace: 10s }
    service c { start: "c", grace: 2m }
    service d { start: "d", grace: 1h }
    service e { start: "e", grace: 1_500ms }
    service f { start: "f", grace: "90s" }
    service g { start: "g", grace: 0s }
};

fn main() {
    let graces: Vec<Duration> = HOME.services().iter().map(|s| s.grace()).collect();
    assert_eq!(
        graces,
        [
            Duration::from_millis(500),
            Duration::from_secs(10),
            Duration::from_secs(120),
            Duration::from_secs(3600),
            Duration::from_millis(1500),
            Duration::from_secs(90),
            Duration::ZERO,
        ]
    );
}
