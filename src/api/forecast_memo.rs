//! Forecasts computed once and served until they could differ. A forecast is a pure function
//! of the champion's weights and the series' rows, so it is keyed by the champion's id and the
//! series' data revision (bumped by every import, in the import's transaction): any change of
//! either is a new key, which is why nothing here ever needs invalidating, and why every API
//! process can keep its own memo. Requests that miss together wait for one computation.
//! At most a byte budget is held, least recently used evicted first.

use std::future::Future;
use std::sync::{Arc, Mutex};

use actix_web::web::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::OnceCell;

use crate::forecast::xlstm::SeriesForecast;
use crate::store::VersionRef;

pub const DEFAULT_FORECAST_MEMO_BYTES: usize =
    crate::config::DEFAULT_FORECAST_MEMO_MIB * 1024 * 1024;

/// What a forecast was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoKey {
    pub series_id: i64,
    /// SQLite may give a deleted series' id to a new one: the creation time tells them apart.
    pub series_created_at: DateTime<Utc>,
    pub model_version: VersionRef,
    pub data_revision: i64,
}

/// Renderings kept per forecast: one per distinct (horizon, levels) asked for, up to this many.
const MAX_RENDERINGS: usize = 4;

/// Which part of a forecast a response shows: its first `horizon` steps and the levels at
/// these positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub horizon: usize,
    pub levels: Vec<usize>,
}

/// A forecast at the model's full horizon and every level, with when it was computed, and
/// the response bodies already rendered from it (formatting thousands of floats costs more
/// than everything else a reused forecast needs).
#[derive(Debug)]
pub struct MemoForecast {
    pub forecast: SeriesForecast,
    pub issued_at: DateTime<Utc>,
    renderings: Mutex<Vec<(Selection, Bytes)>>,
}

impl MemoForecast {
    pub fn new(forecast: SeriesForecast, issued_at: DateTime<Utc>) -> Self {
        Self {
            forecast,
            issued_at,
            renderings: Mutex::new(Vec::new()),
        }
    }

    pub fn rendering(&self, selection: &Selection) -> Option<Bytes> {
        let renderings = self.renderings.lock().expect("forecast memo lock poisoned");
        renderings
            .iter()
            .find(|(s, _)| s == selection)
            .map(|(_, body)| body.clone())
    }

    fn bytes(&self) -> usize {
        let forecast = &self.forecast;
        let steps = forecast.timestamps.len();
        let channels = forecast.channels.len();
        let values = steps * channels * (1 + forecast.quantile_levels.len());
        std::mem::size_of::<Self>()
            + values * std::mem::size_of::<f32>()
            + steps * (std::mem::size_of::<DateTime<Utc>>() + 2 * std::mem::size_of::<Vec<f32>>())
            + steps * channels * std::mem::size_of::<Vec<f32>>()
            + forecast.channels.iter().map(String::len).sum::<usize>()
    }
}

/// Whether a forecast came from the memo or was computed for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoOutcome {
    Reused,
    Computed,
}

type Slot = Arc<OnceCell<Arc<MemoForecast>>>;

pub struct ForecastMemo {
    budget_bytes: usize,
    /// Most recently used last: `(key, slot, bytes once filled)`.
    entries: Mutex<Vec<(MemoKey, Slot, usize)>>,
}

impl ForecastMemo {
    /// A budget of 0 turns the memo off: every request computes.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The forecast for `key`, from the memo or from `compute` (run by one caller at a time
    /// per key; if it fails, the next caller tries again).
    pub async fn get_or_compute<E, F, Fut>(
        &self,
        key: MemoKey,
        compute: F,
    ) -> Result<(Arc<MemoForecast>, MemoOutcome), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<MemoForecast, E>>,
    {
        if self.budget_bytes == 0 {
            return Ok((Arc::new(compute().await?), MemoOutcome::Computed));
        }
        let slot = self.slot(key);
        let mut outcome = MemoOutcome::Reused;
        let forecast = slot
            .get_or_try_init(|| async {
                outcome = MemoOutcome::Computed;
                compute().await.map(Arc::new)
            })
            .await?
            .clone();
        if outcome == MemoOutcome::Computed {
            self.account(key, &slot, forecast.bytes());
        }
        Ok((forecast, outcome))
    }

    /// Keeps `body` as the rendering of `selection` of the forecast memoised under `key`
    /// (unless it has as many as it keeps, or was evicted meanwhile).
    pub fn add_rendering(
        &self,
        key: MemoKey,
        forecast: &MemoForecast,
        selection: Selection,
        body: Bytes,
    ) {
        if self.budget_bytes == 0 {
            return;
        }
        let mut entries = self.entries.lock().expect("forecast memo lock poisoned");
        let Some(position) = entries.iter().position(|(k, slot, _)| {
            *k == key
                && slot
                    .get()
                    .is_some_and(|held| std::ptr::eq(&**held, forecast))
        }) else {
            return;
        };
        {
            let mut renderings = forecast
                .renderings
                .lock()
                .expect("forecast memo lock poisoned");
            if renderings.len() >= MAX_RENDERINGS || renderings.iter().any(|(s, _)| *s == selection)
            {
                return;
            }
            entries[position].2 += body.len();
            renderings.push((selection, body));
        }
        let slot = entries[position].1.clone();
        Self::evict(&mut entries, self.budget_bytes, &slot);
    }

    pub fn cached_bytes(&self) -> usize {
        let entries = self.entries.lock().expect("forecast memo lock poisoned");
        entries.iter().map(|(_, _, bytes)| bytes).sum()
    }

    fn slot(&self, key: MemoKey) -> Slot {
        let mut entries = self.entries.lock().expect("forecast memo lock poisoned");
        if let Some(position) = entries.iter().position(|(k, _, _)| *k == key) {
            let entry = entries.remove(position);
            let slot = entry.1.clone();
            entries.push(entry);
            return slot;
        }
        // A series is forecast from its newest rows by its current champion, so its older
        // keys will not be asked for again.
        entries.retain(|(k, _, _)| k.series_id != key.series_id);
        let slot = Slot::default();
        entries.push((key, slot.clone(), 0));
        slot
    }

    /// Records the size of a filled slot and evicts the least recently used beyond the budget.
    fn account(&self, key: MemoKey, slot: &Slot, bytes: usize) {
        let mut entries = self.entries.lock().expect("forecast memo lock poisoned");
        let Some(entry) = entries
            .iter_mut()
            .find(|(k, s, _)| *k == key && Arc::ptr_eq(s, slot))
        else {
            return; // evicted or superseded while it was computed
        };
        entry.2 = bytes;
        Self::evict(&mut entries, self.budget_bytes, slot);
    }

    /// Evicts least recently used entries other than `keep` until the budget holds (`keep`
    /// too if it alone exceeds it).
    fn evict(entries: &mut Vec<(MemoKey, Slot, usize)>, budget_bytes: usize, keep: &Slot) {
        let mut used: usize = entries.iter().map(|(_, _, b)| b).sum();
        while used > budget_bytes {
            let Some(oldest) = entries.iter().position(|(_, s, _)| !Arc::ptr_eq(s, keep)) else {
                entries.retain(|(_, s, _)| !Arc::ptr_eq(s, keep));
                return;
            };
            used -= entries.remove(oldest).2;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn forecast(steps: usize) -> MemoForecast {
        MemoForecast::new(
            SeriesForecast {
                origin: DateTime::UNIX_EPOCH,
                timestamps: vec![DateTime::UNIX_EPOCH; steps],
                channels: vec!["a".into()],
                quantile_levels: vec![0.5],
                mean: vec![vec![1.0]; steps],
                quantiles: vec![vec![vec![1.0]]; steps],
            },
            Utc::now(),
        )
    }

    fn key(series_id: i64, data_revision: i64) -> MemoKey {
        MemoKey {
            series_id,
            series_created_at: DateTime::UNIX_EPOCH,
            model_version: VersionRef {
                id: 1,
                created_at: DateTime::UNIX_EPOCH,
            },
            data_revision,
        }
    }

    async fn get(memo: &ForecastMemo, key: MemoKey, computed: &AtomicUsize) -> MemoOutcome {
        memo.get_or_compute::<(), _, _>(key, || async {
            computed.fetch_add(1, Ordering::SeqCst);
            Ok(forecast(4))
        })
        .await
        .unwrap()
        .1
    }

    #[tokio::test]
    async fn a_key_is_computed_once_and_a_new_revision_computes_again() {
        let memo = ForecastMemo::new(1 << 20);
        let computed = AtomicUsize::new(0);
        assert_eq!(
            get(&memo, key(1, 0), &computed).await,
            MemoOutcome::Computed
        );
        assert_eq!(get(&memo, key(1, 0), &computed).await, MemoOutcome::Reused);
        assert_eq!(
            get(&memo, key(1, 1), &computed).await,
            MemoOutcome::Computed
        );
        assert_eq!(computed.load(Ordering::SeqCst), 2);
        // The older revision of the series was dropped when the newer one was asked for.
        let one_entry = memo.cached_bytes();
        assert_eq!(
            get(&memo, key(2, 0), &computed).await,
            MemoOutcome::Computed
        );
        assert_eq!(memo.cached_bytes(), 2 * one_entry);
    }

    #[tokio::test]
    async fn concurrent_misses_wait_for_one_computation() {
        let memo = Arc::new(ForecastMemo::new(1 << 20));
        let computed = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (memo, computed) = (memo.clone(), computed.clone());
                tokio::spawn(async move {
                    memo.get_or_compute::<(), _, _>(key(1, 0), || async {
                        computed.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        Ok(forecast(4))
                    })
                    .await
                    .unwrap()
                    .1
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == MemoOutcome::Computed)
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn renderings_are_kept_per_selection_and_count_against_the_budget() {
        let memo = ForecastMemo::new(1 << 20);
        let (held, _) = memo
            .get_or_compute::<(), _, _>(key(1, 0), || async { Ok(forecast(4)) })
            .await
            .unwrap();
        let before = memo.cached_bytes();
        let full = Selection {
            horizon: 4,
            levels: vec![0],
        };
        let short = Selection {
            horizon: 2,
            levels: vec![0],
        };
        memo.add_rendering(key(1, 0), &held, full.clone(), Bytes::from_static(b"full"));
        assert_eq!(held.rendering(&full).unwrap(), "full");
        assert_eq!(held.rendering(&short), None);
        assert_eq!(memo.cached_bytes(), before + 4);
        // A forecast no longer memoised gets no renderings.
        let (other, _) = memo
            .get_or_compute::<(), _, _>(key(1, 1), || async { Ok(forecast(4)) })
            .await
            .unwrap();
        memo.add_rendering(key(1, 0), &held, short.clone(), Bytes::from_static(b"x"));
        assert_eq!(held.rendering(&short), None);
        for horizon in 1..=6 {
            let selection = Selection {
                horizon,
                levels: vec![0],
            };
            memo.add_rendering(key(1, 1), &other, selection, Bytes::from_static(b"y"));
        }
        assert_eq!(other.renderings.lock().unwrap().len(), MAX_RENDERINGS);
    }

    #[tokio::test]
    async fn a_failed_computation_is_not_kept() {
        let memo = ForecastMemo::new(1 << 20);
        let failed = memo
            .get_or_compute(key(1, 0), || async { Err::<MemoForecast, _>("boom") })
            .await;
        assert!(failed.is_err());
        let computed = AtomicUsize::new(0);
        assert_eq!(
            get(&memo, key(1, 0), &computed).await,
            MemoOutcome::Computed
        );
    }

    #[tokio::test]
    async fn the_budget_evicts_the_least_recently_used_and_zero_turns_it_off() {
        let size = forecast(4).bytes();
        let memo = ForecastMemo::new(2 * size);
        let computed = AtomicUsize::new(0);
        get(&memo, key(1, 0), &computed).await;
        get(&memo, key(2, 0), &computed).await;
        get(&memo, key(1, 0), &computed).await; // series 1 is now the most recent
        get(&memo, key(3, 0), &computed).await; // evicts series 2
        assert_eq!(memo.cached_bytes(), 2 * size);
        assert_eq!(get(&memo, key(1, 0), &computed).await, MemoOutcome::Reused);
        assert_eq!(
            get(&memo, key(2, 0), &computed).await,
            MemoOutcome::Computed
        );

        let off = ForecastMemo::new(0);
        assert_eq!(get(&off, key(1, 0), &computed).await, MemoOutcome::Computed);
        assert_eq!(get(&off, key(1, 0), &computed).await, MemoOutcome::Computed);
        assert_eq!(off.cached_bytes(), 0);
    }
}
