//! The health state machine of one backend: HAProxy's counter semantics, no I/O, no clock.
//!
//! The counter runs from 0 to `rise + fall - 1`. A backend is up while the counter is at or
//! above `rise`. A success while down counts up and, on reaching `rise`, jumps to the top (so
//! a fresh up backend survives `fall - 1` failures). A failure while up counts down; the one
//! that would take it below `rise` drops it to 0 and the backend is down. A failure while still
//! rising also drops it to 0: `rise` successes must be consecutive.
//!
//! Being pure, it is tested exhaustively here; `checker.rs` drives it with real probes.

use std::time::Duration;

use crate::config::Health;

/// A change of verdict produced by one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    rise: u32,
    fall: u32,
    /// 0..=rise+fall-1; up iff `>= rise`.
    counter: u32,
}

impl Machine {
    /// A machine in the given state. An up backend starts at `rise`, not at the top, as in
    /// HAProxy: a fresh start serves at once, and one failed check takes a dead backend out.
    pub fn new(rise: u32, fall: u32, up: bool) -> Machine {
        let rise = rise.max(1);
        let fall = fall.max(1);
        Machine {
            rise,
            fall,
            counter: if up { rise } else { 0 },
        }
    }

    fn top(&self) -> u32 {
        self.rise + self.fall - 1
    }

    pub fn is_up(&self) -> bool {
        self.counter >= self.rise
    }

    pub fn counter(&self) -> u32 {
        self.counter
    }

    /// Feeds one check result; returns the transition it caused, if any.
    pub fn observe(&mut self, success: bool) -> Option<Transition> {
        let was_up = self.is_up();
        if success {
            if self.counter < self.top() {
                self.counter += 1;
                if self.counter >= self.rise {
                    self.counter = self.top();
                }
            }
        } else if self.counter > self.rise {
            self.counter -= 1;
        } else {
            // At `rise` (the last up step) or anywhere below it (rising, or down).
            self.counter = 0;
        }
        match (was_up, self.is_up()) {
            (false, true) => Some(Transition::Up),
            (true, false) => Some(Transition::Down),
            _ => None,
        }
    }

    /// Puts the machine in the down state at once (passive health tripped); `rise`
    /// successful checks bring it back.
    pub fn force_down(&mut self) {
        self.counter = 0;
    }

    /// Adopts new `rise`/`fall` after a reload, keeping the verdict.
    pub fn retune(&mut self, rise: u32, fall: u32) {
        let up = self.is_up();
        self.rise = rise.max(1);
        self.fall = fall.max(1);
        self.counter = if up {
            self.counter.clamp(self.rise, self.top())
        } else {
            self.counter.min(self.rise - 1)
        };
    }

    /// The wait before the next check, before spread: `interval` while steadily up,
    /// `down_interval` while steadily down, `fast_interval` while changing state (HAProxy's
    /// `inter`, `downinter`, `fastinter`).
    pub fn next_interval(&self, h: &Health) -> Duration {
        if self.counter == self.top() {
            h.interval
        } else if self.counter == 0 {
            h.down_interval
        } else {
            h.fast_interval
        }
    }
}

/// Health settings for tests: HAProxy's defaults with distinct intervals and no spread.
#[cfg(test)]
pub(crate) fn test_health(check: bool) -> Health {
    Health {
        check,
        interval: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
        rise: 2,
        fall: 3,
        fast_interval: Duration::from_millis(500),
        down_interval: Duration::from_secs(10),
        error_limit: 10,
        initial_up: true,
        spread_percent: 0,
        probe: crate::config::Probe::Tcp,
        send_proxy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(m: &mut Machine, results: &str) -> Vec<Option<Transition>> {
        results.chars().map(|c| m.observe(c == '+')).collect()
    }

    #[test]
    fn a_fresh_up_backend_goes_down_at_its_first_failed_check() {
        let mut m = Machine::new(2, 3, true);
        assert!(m.is_up());
        assert_eq!(m.observe(false), Some(Transition::Down));
        assert_eq!(m.counter(), 0);
    }

    #[test]
    fn a_settled_up_backend_needs_fall_consecutive_failures_to_go_down() {
        let mut m = Machine::new(2, 3, true);
        assert_eq!(m.observe(true), None);
        assert_eq!(m.counter(), 4);
        assert_eq!(run(&mut m, "--"), vec![None, None]);
        assert!(m.is_up());
        assert_eq!(m.observe(false), Some(Transition::Down));
        assert!(!m.is_up());
    }

    #[test]
    fn a_success_between_failures_while_up_restores_the_full_margin() {
        let mut m = Machine::new(2, 3, true);
        m.observe(true);
        run(&mut m, "--+");
        // One success from `rise` jumps back to the top: three more failures are needed.
        assert_eq!(m.counter(), 4);
        assert_eq!(run(&mut m, "---"), vec![None, None, Some(Transition::Down)]);
    }

    #[test]
    fn a_down_backend_needs_rise_consecutive_successes_to_come_up() {
        let mut m = Machine::new(3, 2, false);
        assert_eq!(run(&mut m, "+++"), vec![None, None, Some(Transition::Up)]);
        assert_eq!(m.counter(), 4);
    }

    #[test]
    fn a_failure_while_rising_starts_the_count_again() {
        let mut m = Machine::new(3, 2, false);
        assert_eq!(run(&mut m, "++-"), vec![None, None, None]);
        assert_eq!(m.counter(), 0);
        assert_eq!(
            run(&mut m, "++-+++"),
            vec![None, None, None, None, None, Some(Transition::Up)]
        );
    }

    #[test]
    fn rise_one_and_fall_one_flip_on_every_change() {
        let mut m = Machine::new(1, 1, true);
        assert_eq!(
            run(&mut m, "-++-"),
            vec![
                Some(Transition::Down),
                Some(Transition::Up),
                None,
                Some(Transition::Down)
            ]
        );
    }

    #[test]
    fn force_down_needs_rise_successes_to_return() {
        let mut m = Machine::new(2, 3, true);
        m.observe(true);
        m.force_down();
        assert!(!m.is_up());
        assert_eq!(run(&mut m, "++"), vec![None, Some(Transition::Up)]);
    }

    #[test]
    fn retune_keeps_the_verdict() {
        let mut up = Machine::new(2, 3, true);
        up.retune(5, 1);
        assert!(up.is_up());
        assert_eq!(up.observe(false), Some(Transition::Down));
        let mut down = Machine::new(4, 3, false);
        run(&mut down, "+++");
        down.retune(2, 2);
        assert!(!down.is_up());
        assert_eq!(down.observe(true), Some(Transition::Up));
    }

    fn health() -> Health {
        super::test_health(true)
    }

    #[test]
    fn intervals_are_normal_when_settled_up_fast_when_changing_and_slow_when_down() {
        let h = health();
        let mut m = Machine::new(2, 3, true);
        // Freshly up at `rise`: not settled yet.
        assert_eq!(m.next_interval(&h), h.fast_interval);
        m.observe(true);
        assert_eq!(m.next_interval(&h), h.interval);
        m.observe(false);
        assert_eq!(m.next_interval(&h), h.fast_interval, "falling");
        m.observe(false);
        m.observe(false);
        assert!(!m.is_up());
        assert_eq!(m.next_interval(&h), h.down_interval);
        m.observe(true);
        assert_eq!(m.next_interval(&h), h.fast_interval, "rising");
        m.observe(true);
        assert_eq!(m.next_interval(&h), h.interval);
    }
}
