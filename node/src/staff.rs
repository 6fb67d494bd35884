//! Staff sign-in for a till reachable from the LAN: the staff book (names and PIN hashes, one file
//! in the data directory, written by `stallmesh staff add`), the signed-in sessions, and the limit
//! on wrong PINs.
//!
//! PINs are short, so what protects them is the cost of each guess: the book keeps Argon2id hashes
//! (never the PIN), and wrong PINs are limited per name and overall. The book stays on the device
//! (it is not replicated): a PIN hash in every tablet's journal would let anyone with one tablet
//! try every 4-digit PIN offline.
//!
//! Architecture invariant: a session token is 32 random bytes known only to the browser (an
//! HttpOnly cookie) and this process's memory; a restarted node signs everyone out.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The staff book's file in the data directory.
pub const STAFF_FILE: &str = "staff.json";
/// Staff members in one book: a market stall's team, with room.
pub const MAX_STAFF: usize = 100;
/// Longest staff name (it is recorded on every sale the member makes, within the ledger's limit).
pub const MAX_STAFF_NAME_LEN: usize = stallmesh_ledger::MAX_STAFF_NAME_CHARS;
/// PIN length: at least 6 digits (a million PINs: see the guessing bound below), at most 12.
pub const MIN_PIN_LEN: usize = 6;
pub const MAX_PIN_LEN: usize = 12;
/// Sessions held at once: tablets and phones of one stall, with room; beyond it, sign-in is refused.
pub const MAX_SESSIONS: usize = 256;
/// A session lasts a market day.
pub const SESSION_TTL_MS: u64 = 14 * 3600 * 1000;
/// Wrong PINs for one name within [`FAILURE_WINDOW_MS`] before that name is locked for the rest of it.
pub const MAX_FAILURES_PER_NAME: usize = 5;
/// Wrong PINs from one client address within the window, whatever the names.
pub const MAX_FAILURES_PER_CLIENT: usize = 10;
/// Wrong PINs for all names together within the window: guessing across names and addresses is
/// limited too (at the cost that someone guessing locks everyone out for the window).
pub const MAX_FAILURES_OVERALL: usize = 30;
pub const FAILURE_WINDOW_MS: u64 = 5 * 60 * 1000;
const _: () = assert!(MAX_FAILURES_PER_NAME <= MAX_FAILURES_PER_CLIENT && MAX_FAILURES_PER_CLIENT <= MAX_FAILURES_OVERALL);
// At the overall limit a guesser gets 8,640 tries a day across every name: under 1% of the
// 6-digit PINs, so even a team of several keeps each PIN unguessed over a market day.
const _: () = assert!(MAX_FAILURES_OVERALL * (24 * 3600 * 1000 / FAILURE_WINDOW_MS as usize) * 100 < 1_000_000);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StaffError {
    #[error("staff name must be 1..={MAX_STAFF_NAME_LEN} characters of letters, digits, spaces, '-' or '.'")]
    BadName,
    #[error("a PIN is {MIN_PIN_LEN}..={MAX_PIN_LEN} digits")]
    BadPin,
    #[error("the staff book holds at most {MAX_STAFF} members")]
    Full,
    #[error("no staff member named {0:?}")]
    Unknown(String),
    #[error("wrong PIN")]
    WrongPin,
    #[error("too many wrong PINs: try again in {retry_after_s} s")]
    TooManyAttempts { retry_after_s: u64 },
    #[error("staff book {path}: {detail}")]
    File { path: PathBuf, detail: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BookFile {
    /// Name → Argon2id hash of the PIN (PHC string).
    staff: BTreeMap<String, String>,
}

/// The staff book on disk.
pub struct StaffBook {
    path: PathBuf,
}

impl StaffBook {
    pub fn in_data_dir(data_dir: &Path) -> StaffBook {
        StaffBook { path: data_dir.join(STAFF_FILE) }
    }

    fn read(&self) -> Result<BookFile, StaffError> {
        let bad = |detail: String| StaffError::File { path: self.path.clone(), detail };
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let book: BookFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
                if book.staff.len() > MAX_STAFF {
                    return Err(bad(format!("more than {MAX_STAFF} members")));
                }
                Ok(book)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BookFile::default()),
            Err(e) => Err(bad(e.to_string())),
        }
    }

    fn write(&self, book: &BookFile) -> Result<(), StaffError> {
        let bad = |e: std::io::Error| StaffError::File { path: self.path.clone(), detail: e.to_string() };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(bad)?;
        }
        // Written aside and renamed: a power cut never leaves half a book.
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(book).expect("serializable")).map_err(bad)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(bad)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(bad)
    }

    /// The members' names, sorted.
    pub fn names(&self) -> Result<Vec<String>, StaffError> {
        Ok(self.read()?.staff.into_keys().collect())
    }

    /// Adds a member, or sets a new PIN for one.
    pub fn set(&self, name: &str, pin: &str) -> Result<(), StaffError> {
        check_name(name)?;
        check_pin(pin)?;
        let mut book = self.read()?;
        if !book.staff.contains_key(name) && book.staff.len() >= MAX_STAFF {
            return Err(StaffError::Full);
        }
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default().hash_password(pin.as_bytes(), &salt).expect("default Argon2 parameters hash any PIN").to_string();
        book.staff.insert(name.to_string(), hash);
        self.write(&book)
    }

    pub fn remove(&self, name: &str) -> Result<(), StaffError> {
        let mut book = self.read()?;
        book.staff.remove(name).ok_or_else(|| StaffError::Unknown(name.to_string()))?;
        self.write(&book)
    }

    /// Checks a PIN against the book. Takes the hash's time (tens of milliseconds) on purpose.
    pub fn verify(&self, name: &str, pin: &str) -> Result<(), StaffError> {
        let book = self.read()?;
        let Some(hash) = book.staff.get(name) else { return Err(StaffError::Unknown(name.to_string())) };
        let hash = PasswordHash::new(hash).map_err(|e| StaffError::File { path: self.path.clone(), detail: format!("{name}: {e}") })?;
        Argon2::default().verify_password(pin.as_bytes(), &hash).map_err(|_| StaffError::WrongPin)
    }
}

fn check_name(name: &str) -> Result<(), StaffError> {
    // The ledger's rule: a name the book takes is one every replica accepts on a sale.
    if stallmesh_ledger::validate::is_staff_name(name) {
        Ok(())
    } else {
        Err(StaffError::BadName)
    }
}

fn check_pin(pin: &str) -> Result<(), StaffError> {
    if (MIN_PIN_LEN..=MAX_PIN_LEN).contains(&pin.len()) && pin.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(StaffError::BadPin)
    }
}

struct Session {
    staff: String,
    expires_ms: u64,
}

/// Signed-in sessions and recent wrong PINs, in memory.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    /// Held across a whole PIN check: checks run one at a time, so parallel guesses cannot all pass
    /// the lock before any is counted, and a burst costs one hash's memory, not one per request.
    failures: Mutex<Failures>,
}

#[derive(Default)]
struct Failures {
    /// Times of wrong PINs, oldest first, with the name tried and the client's address.
    recent: VecDeque<(u64, String, String)>,
}

impl Failures {
    fn forget_before(&mut self, now_ms: u64) {
        while self.recent.front().is_some_and(|(t, _, _)| t.saturating_add(FAILURE_WINDOW_MS) <= now_ms) {
            self.recent.pop_front();
        }
    }

    /// `Some(seconds)` while `name`, `client` (or everyone) is locked out.
    fn locked(&mut self, name: &str, client: &str, now_ms: u64) -> Option<u64> {
        self.forget_before(now_ms);
        let times = |keep: &dyn Fn(&(u64, String, String)) -> bool| -> Vec<u64> { self.recent.iter().filter(|f| keep(f)).map(|f| f.0).collect() };
        // The lock lasts until the oldest of the last `max` failures leaves the window.
        let until = |times: Vec<u64>, max: usize| (times.len() >= max).then(|| times[times.len() - max].saturating_add(FAILURE_WINDOW_MS));
        let until = [
            until(times(&|f| f.1 == name), MAX_FAILURES_PER_NAME),
            until(times(&|f| f.2 == client), MAX_FAILURES_PER_CLIENT),
            until(times(&|_| true), MAX_FAILURES_OVERALL),
        ]
        .into_iter()
        .flatten()
        .max()?;
        Some(until.saturating_sub(now_ms).div_ceil(1000).max(1))
    }
}

impl Sessions {
    /// Checks the PIN (unless too many were wrong lately, for this name, this client or anyone) and
    /// opens a session: its token. `replaces` (the session the request carried) ends.
    pub fn sign_in(&self, book: &StaffBook, name: &str, pin: &str, client: &str, replaces: Option<&str>, now_ms: u64) -> Result<String, StaffError> {
        check_name(name).map_err(|_| StaffError::WrongPin)?;
        let mut failures = self.failures.lock().expect("failures lock");
        if let Some(retry_after_s) = failures.locked(name, client, now_ms) {
            return Err(StaffError::TooManyAttempts { retry_after_s });
        }
        match book.verify(name, pin) {
            Ok(()) => {}
            Err(e @ (StaffError::WrongPin | StaffError::Unknown(_))) => {
                failures.recent.push_back((now_ms, name.to_string(), client.to_string()));
                // Bounded by the window's overall limit: older entries never lock anyone.
                while failures.recent.len() > MAX_FAILURES_OVERALL {
                    failures.recent.pop_front();
                }
                // An unknown name answers as a wrong PIN: the answer does not tell names apart.
                return Err(if matches!(e, StaffError::Unknown(_)) { StaffError::WrongPin } else { e });
            }
            Err(e) => return Err(e),
        }
        drop(failures);
        Ok(self.open_session(name, replaces, now_ms))
    }

    /// Opens a session for `staff` (whose PIN was checked), ending `replaces`.
    fn open_session(&self, staff: &str, replaces: Option<&str>, now_ms: u64) -> String {
        let mut open = self.open.lock().expect("sessions lock");
        open.retain(|_, s| s.expires_ms > now_ms);
        if let Some(old) = replaces {
            open.remove(old);
        }
        // Full: the session closest to expiring ends (staff who signed in earliest), rather than
        // nobody being able to sign in.
        if open.len() >= MAX_SESSIONS {
            if let Some(oldest) = open.iter().min_by_key(|(_, s)| s.expires_ms).map(|(t, _)| t.clone()) {
                open.remove(&oldest);
            }
        }
        debug_assert!(open.len() < MAX_SESSIONS);
        let mut token = [0u8; 32];
        getrandom::getrandom(&mut token).expect("the OS has randomness");
        let token = hex::encode(token);
        open.insert(token.clone(), Session { staff: staff.to_string(), expires_ms: now_ms.saturating_add(SESSION_TTL_MS) });
        token
    }

    /// The staff member signed in with `token`, if the session is open.
    pub fn staff_of(&self, token: &str, now_ms: u64) -> Option<String> {
        let open = self.open.lock().expect("sessions lock");
        open.get(token).filter(|s| s.expires_ms > now_ms).map(|s| s.staff.clone())
    }

    pub fn sign_out(&self, token: &str) {
        self.open.lock().expect("sessions lock").remove(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> (tempfile::TempDir, StaffBook) {
        let dir = tempfile::tempdir().unwrap();
        let book = StaffBook::in_data_dir(dir.path());
        book.set("Ana", "246810").unwrap();
        (dir, book)
    }

    #[test]
    fn the_book_keeps_a_hash_not_the_pin_and_checks_it() {
        let (dir, book) = book();
        let text = std::fs::read_to_string(dir.path().join(STAFF_FILE)).unwrap();
        assert!(!text.contains("246810") && text.contains("$argon2id$"), "{text}");
        assert_eq!(book.verify("Ana", "246810"), Ok(()));
        assert_eq!(book.verify("Ana", "246811"), Err(StaffError::WrongPin));
        assert_eq!(book.names().unwrap(), vec!["Ana".to_string()]);
        assert_eq!(book.set("Ana", "2468"), Err(StaffError::BadPin), "four digits are too few");
        assert_eq!(book.set("Ana", "12ab"), Err(StaffError::BadPin));
        assert_eq!(book.set("<script>", "1234"), Err(StaffError::BadName));
    }

    #[test]
    fn wrong_pins_lock_the_name_for_the_window_and_a_session_names_its_staff() {
        let (_dir, book) = book();
        let sessions = Sessions::default();
        for i in 0..MAX_FAILURES_PER_NAME as u64 {
            assert_eq!(sessions.sign_in(&book, "Ana", "000000", "10.0.0.9", None, 1_000 + i), Err(StaffError::WrongPin));
        }
        // The right PIN does not help while locked: guessing gains nothing from the lock's end.
        let locked = sessions.sign_in(&book, "Ana", "246810", "10.0.0.7", None, 2_000);
        assert!(matches!(locked, Err(StaffError::TooManyAttempts { retry_after_s: 299.. })), "{locked:?}");
        let token = sessions.sign_in(&book, "Ana", "246810", "10.0.0.7", None, 1_000 + FAILURE_WINDOW_MS).unwrap();
        assert_eq!(sessions.staff_of(&token, 1_000 + FAILURE_WINDOW_MS), Some("Ana".to_string()));
        assert_eq!(sessions.staff_of(&token, 1_000 + FAILURE_WINDOW_MS + SESSION_TTL_MS), None, "expired");
        // Signing in again ends the session the request carried.
        let again = sessions.sign_in(&book, "Ana", "246810", "10.0.0.7", Some(&token), 1_000 + FAILURE_WINDOW_MS).unwrap();
        assert_eq!(sessions.staff_of(&token, 1_000 + FAILURE_WINDOW_MS), None);
        sessions.sign_out(&again);
        assert_eq!(sessions.staff_of(&again, 1_000 + FAILURE_WINDOW_MS), None);
        // An unknown name answers as a wrong PIN.
        assert_eq!(sessions.sign_in(&book, "Bob", "246810", "10.0.0.7", None, 10), Err(StaffError::WrongPin));
    }

    #[test]
    fn one_client_guessing_across_names_is_locked_too() {
        let (_dir, book) = book();
        book.set("Bea", "135790").unwrap();
        let sessions = Sessions::default();
        // One wrong PIN for each of many names: no name reaches its own limit.
        for i in 0..MAX_FAILURES_PER_CLIENT as u64 {
            let name = format!("Guess {i}");
            assert_eq!(sessions.sign_in(&book, &name, "000000", "10.0.0.9", None, 1_000 + i), Err(StaffError::WrongPin), "try {i}");
        }
        let locked = sessions.sign_in(&book, "Bea", "135790", "10.0.0.9", None, 2_000);
        assert!(matches!(locked, Err(StaffError::TooManyAttempts { .. })), "{locked:?}");
        // Bea at her own till is not locked out by someone else's guessing under the overall limit.
        assert!(sessions.sign_in(&book, "Bea", "135790", "10.0.0.5", None, 2_000).is_ok());
    }

    #[test]
    fn a_full_session_table_ends_the_oldest_session_rather_than_refusing() {
        let sessions = Sessions::default();
        let first = sessions.open_session("Ana", None, 1);
        for t in 2..=MAX_SESSIONS as u64 {
            sessions.open_session("Ana", None, t);
        }
        assert!(sessions.staff_of(&first, 10).is_some());
        let newest = sessions.open_session("Ana", None, 1_000);
        assert_eq!(sessions.staff_of(&first, 1_000), None, "the oldest made room");
        assert!(sessions.staff_of(&newest, 1_000).is_some());
    }
}
