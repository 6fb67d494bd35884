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
/// Longest staff name (it is recorded on every sale the member makes).
pub const MAX_STAFF_NAME_LEN: usize = 40;
/// PIN length: at least 4 digits, at most 12.
pub const MIN_PIN_LEN: usize = 4;
pub const MAX_PIN_LEN: usize = 12;
/// Sessions held at once: tablets and phones of one stall, with room; beyond it, sign-in is refused.
pub const MAX_SESSIONS: usize = 256;
/// A session lasts a market day.
pub const SESSION_TTL_MS: u64 = 14 * 3600 * 1000;
/// Wrong PINs for one name within [`FAILURE_WINDOW_MS`] before that name is locked for the rest of it.
pub const MAX_FAILURES_PER_NAME: usize = 5;
/// Wrong PINs for all names together within the window: guessing across names is limited too.
pub const MAX_FAILURES_OVERALL: usize = 20;
pub const FAILURE_WINDOW_MS: u64 = 5 * 60 * 1000;
const _: () = assert!(MAX_FAILURES_PER_NAME <= MAX_FAILURES_OVERALL);
// At 5 guesses per 5 minutes a 4-digit PIN takes over a day on average: longer than a market day.
const _: () = assert!(10_000 / 2 / MAX_FAILURES_PER_NAME * (FAILURE_WINDOW_MS as usize) > 24 * 3600 * 1000);

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
    #[error("{MAX_SESSIONS} sessions are open: sign someone out first")]
    SessionsFull,
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
    let ok = !name.trim().is_empty()
        && name.chars().count() <= MAX_STAFF_NAME_LEN
        && name.chars().all(|c| c.is_alphanumeric() || " -.".contains(c));
    if ok {
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
    failures: Mutex<Failures>,
}

#[derive(Default)]
struct Failures {
    /// Times of wrong PINs, oldest first, with the name tried.
    recent: VecDeque<(u64, String)>,
}

impl Failures {
    fn forget_before(&mut self, now_ms: u64) {
        while self.recent.front().is_some_and(|(t, _)| t.saturating_add(FAILURE_WINDOW_MS) <= now_ms) {
            self.recent.pop_front();
        }
    }

    /// `Some(seconds)` while `name` (or everyone) is locked out.
    fn locked(&mut self, name: &str, now_ms: u64) -> Option<u64> {
        self.forget_before(now_ms);
        let for_name: Vec<u64> = self.recent.iter().filter(|(_, n)| n == name).map(|(t, _)| *t).collect();
        let until = |times: &[u64], max: usize| (times.len() >= max).then(|| times[times.len() - max] + FAILURE_WINDOW_MS);
        let all: Vec<u64> = self.recent.iter().map(|(t, _)| *t).collect();
        let until = until(&for_name, MAX_FAILURES_PER_NAME).into_iter().chain(until(&all, MAX_FAILURES_OVERALL)).max()?;
        Some(until.saturating_sub(now_ms).div_ceil(1000).max(1))
    }
}

impl Sessions {
    /// Checks the PIN (unless too many were wrong lately) and opens a session: its token.
    pub fn sign_in(&self, book: &StaffBook, name: &str, pin: &str, now_ms: u64) -> Result<String, StaffError> {
        if let Some(retry_after_s) = self.failures.lock().expect("failures lock").locked(name, now_ms) {
            return Err(StaffError::TooManyAttempts { retry_after_s });
        }
        match book.verify(name, pin) {
            Ok(()) => {}
            Err(e @ (StaffError::WrongPin | StaffError::Unknown(_))) => {
                let mut failures = self.failures.lock().expect("failures lock");
                failures.recent.push_back((now_ms, name.to_string()));
                // Bounded by the window's overall limit: older entries never lock anyone.
                while failures.recent.len() > MAX_FAILURES_OVERALL {
                    failures.recent.pop_front();
                }
                // An unknown name answers as a wrong PIN: the answer does not tell names apart.
                return Err(if matches!(e, StaffError::Unknown(_)) { StaffError::WrongPin } else { e });
            }
            Err(e) => return Err(e),
        }
        let mut open = self.open.lock().expect("sessions lock");
        open.retain(|_, s| s.expires_ms > now_ms);
        if open.len() >= MAX_SESSIONS {
            return Err(StaffError::SessionsFull);
        }
        let mut token = [0u8; 32];
        getrandom::getrandom(&mut token).expect("the OS has randomness");
        let token = hex::encode(token);
        open.insert(token.clone(), Session { staff: name.to_string(), expires_ms: now_ms.saturating_add(SESSION_TTL_MS) });
        Ok(token)
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
        book.set("Ana", "2468").unwrap();
        (dir, book)
    }

    #[test]
    fn the_book_keeps_a_hash_not_the_pin_and_checks_it() {
        let (dir, book) = book();
        let text = std::fs::read_to_string(dir.path().join(STAFF_FILE)).unwrap();
        assert!(!text.contains("2468") && text.contains("$argon2id$"), "{text}");
        assert_eq!(book.verify("Ana", "2468"), Ok(()));
        assert_eq!(book.verify("Ana", "2469"), Err(StaffError::WrongPin));
        assert_eq!(book.names().unwrap(), vec!["Ana".to_string()]);
        assert_eq!(book.set("Ana", "12"), Err(StaffError::BadPin));
        assert_eq!(book.set("Ana", "12ab"), Err(StaffError::BadPin));
        assert_eq!(book.set("<script>", "1234"), Err(StaffError::BadName));
    }

    #[test]
    fn wrong_pins_lock_the_name_for_the_window_and_a_session_names_its_staff() {
        let (_dir, book) = book();
        let sessions = Sessions::default();
        for i in 0..MAX_FAILURES_PER_NAME as u64 {
            assert_eq!(sessions.sign_in(&book, "Ana", "0000", 1_000 + i), Err(StaffError::WrongPin));
        }
        // The right PIN does not help while locked: guessing gains nothing from the lock's end.
        assert!(matches!(sessions.sign_in(&book, "Ana", "2468", 2_000), Err(StaffError::TooManyAttempts { retry_after_s: 299.. })));
        let token = sessions.sign_in(&book, "Ana", "2468", 1_000 + FAILURE_WINDOW_MS).unwrap();
        assert_eq!(sessions.staff_of(&token, 1_000 + FAILURE_WINDOW_MS), Some("Ana".to_string()));
        assert_eq!(sessions.staff_of(&token, 1_000 + FAILURE_WINDOW_MS + SESSION_TTL_MS), None, "expired");
        sessions.sign_out(&token);
        assert_eq!(sessions.staff_of(&token, 1_000 + FAILURE_WINDOW_MS), None);
        // An unknown name answers as a wrong PIN.
        assert_eq!(sessions.sign_in(&book, "Bob", "2468", 10), Err(StaffError::WrongPin));
    }
}
