//! What the training commands share: a progress display for training runs on stderr (a bar redrawn in place on a terminal, one line per epoch otherwise).

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::forecast::xlstm::TrainingProgress;

const REDRAW_EVERY: Duration = Duration::from_millis(200);
const BAR_WIDTH: usize = 24;

pub struct TrainingProgressPrinter {
    terminal: bool,
    last_draw: Option<Instant>,
    epochs_reported: usize,
    initial_reported: bool,
    drawn: bool,
}

impl TrainingProgressPrinter {
    pub fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            last_draw: None,
            epochs_reported: 0,
            initial_reported: false,
            drawn: false,
        }
    }

    pub fn show(&mut self, progress: &TrainingProgress) -> ControlFlow<()> {
        let mut stderr = std::io::stderr().lock();
        if !self.initial_reported
            && let Some(initial) = progress.history.first()
        {
            // Epoch 0: the initial weights (with a linear path, exactly its forecast).
            self.initial_reported = true;
            let _ = writeln!(
                stderr,
                "epoch 0/{}  val {:.4}  (initial weights, {:.1} s)",
                progress.max_epochs, initial.val_loss, initial.seconds
            );
        }
        let finished_epochs = progress.history.len().saturating_sub(1);
        if finished_epochs > self.epochs_reported {
            self.epochs_reported = finished_epochs;
            if let Some(record) = progress.history.last() {
                let train = record
                    .train_loss
                    .map_or("-".to_string(), |l| format!("{l:.4}"));
                let clear = if self.drawn { "\r\x1b[2K" } else { "" };
                // A check within the epoch says how far into it it came.
                let at = record.mid_epoch_step.map_or(String::new(), |step| {
                    format!("  step {step}/{}", progress.steps_per_epoch)
                });
                // The weights of the deep correction that scored `val`, nearest steps first.
                let scale = record.deep_scale.as_ref().map_or(String::new(), |weights| {
                    let weights: Vec<String> = weights.iter().map(|w| format!("{w:.2}")).collect();
                    format!(" (deep ×{})", weights.join(" "))
                });
                let _ = writeln!(
                    stderr,
                    "{clear}epoch {}/{}{at}  train {train}  val {:.4}{scale}  best {:.4}  ({:.1} s)",
                    record.epoch,
                    progress.max_epochs,
                    record.val_loss,
                    progress.best_val_loss.unwrap_or(f64::NAN),
                    record.seconds
                );
                self.drawn = false;
            }
            return ControlFlow::Continue(());
        }
        if !self.terminal || self.last_draw.is_some_and(|t| t.elapsed() < REDRAW_EVERY) {
            return ControlFlow::Continue(());
        }
        self.last_draw = Some(Instant::now());
        let done = progress.step * BAR_WIDTH / progress.steps_per_epoch.max(1);
        let eta = progress
            .eta_seconds
            .map_or(String::new(), |eta| format!("  eta ≤ {:.0} s", eta));
        let _ = write!(
            stderr,
            "\r\x1b[2Kepoch {}/{} [{}{}] {}/{}  loss {:.4}{eta}",
            progress.epoch,
            progress.max_epochs,
            "#".repeat(done),
            ".".repeat(BAR_WIDTH - done),
            progress.step,
            progress.steps_per_epoch,
            progress.train_loss.unwrap_or(f64::NAN),
        );
        let _ = stderr.flush();
        self.drawn = true;
        ControlFlow::Continue(())
    }

    /// Clears a bar left on the terminal.
    pub fn finish(&mut self) {
        if self.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.drawn = false;
        }
    }
}
