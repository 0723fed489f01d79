//! A CMOS real-time clock (MC146818) that reads the host's UTC time.
//!
//! Linux reads the wall clock from it once at boot, waiting while the
//! "update in progress" bit is set; a port that answers 0xff keeps that bit
//! set and costs a second of busy waiting, so vmrun answers properly.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::BusDevice;

const INDEX_MASK: u8 = 0x7f; // bit 7 of the index port masks NMIs
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz rate, update not in progress.
const STATUS_A: u8 = 0x26;
/// 24-hour mode, BCD values.
const STATUS_B: u8 = 0x02;
/// Valid RAM and time.
const STATUS_D: u8 = 0x80;

/// A calendar time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 1 = Sunday, as the RTC counts.
    pub weekday: u8,
}

impl DateTime {
    /// The UTC calendar time `secs` seconds after the Unix epoch.
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86400) as i64;
        let rem = secs % 86400;
        // Howard Hinnant's civil-from-days algorithm.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday: ((days + 4).rem_euclid(7) + 1) as u8, // 1970-01-01 was a Thursday
        }
    }
}

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The CMOS at ports 0x70 (index) and 0x71 (data).
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: fn() -> u64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

/// The CMOS's index register and RAM, for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub index: u8,
    pub ram: Vec<u8>,
}

impl Cmos {
    /// The state to put in a snapshot.
    pub fn save(&self) -> CmosState {
        CmosState { index: self.index, ram: self.ram.to_vec() }
    }

    /// A CMOS showing the host's time with `state`'s RAM (a RAM of the
    /// wrong size is ignored).
    pub fn restore(state: &CmosState) -> Self {
        let mut c = Self::new();
        c.index = state.index & INDEX_MASK;
        if let Ok(ram) = <[u8; 128]>::try_from(state.ram.as_slice()) {
            c.ram = ram;
        }
        c
    }

    /// A CMOS clock showing the host's time.
    pub fn new() -> Self {
        Self::with_clock(unix_now)
    }

    /// A CMOS clock reading the time from `now` (seconds since the epoch).
    pub fn with_clock(now: fn() -> u64) -> Self {
        Self { index: 0, ram: [0; 128], now }
    }

    fn register(&self, reg: u8) -> u8 {
        let t = || DateTime::from_unix((self.now)());
        match reg {
            REG_SECONDS => bcd(t().second),
            REG_MINUTES => bcd(t().minute),
            REG_HOURS => bcd(t().hour),
            REG_WEEKDAY => bcd(t().weekday),
            REG_DAY => bcd(t().day),
            REG_MONTH => bcd(t().month),
            REG_YEAR => bcd(t().year.rem_euclid(100) as u8),
            REG_CENTURY => bcd(t().year.div_euclid(100).clamp(0, 99) as u8),
            REG_STATUS_A => STATUS_A,
            REG_STATUS_B => STATUS_B,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D,
            _ => self.ram[reg as usize],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            1 => self.register(self.index),
            _ => self.index,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.index = v & INDEX_MASK,
            // The clock itself is read-only; other bytes are plain RAM.
            _ if self.index > REG_STATUS_D && self.index != REG_CENTURY => self.ram[self.index as usize] = v,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_from_unix_time() {
        assert_eq!(
            DateTime::from_unix(0),
            DateTime { year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0, weekday: 5 }
        );
        // 2024-02-29 13:37:42 UTC, a Thursday.
        assert_eq!(
            DateTime::from_unix(1_709_213_862),
            DateTime { year: 2024, month: 2, day: 29, hour: 13, minute: 37, second: 42, weekday: 5 }
        );
        // 2000-03-01 00:00:00, a Wednesday.
        let d = DateTime::from_unix(951_868_800);
        assert_eq!((d.year, d.month, d.day, d.weekday), (2000, 3, 1, 4));
    }

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg | 0x80]);
        let mut b = [0];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn registers_in_bcd() {
        let mut c = Cmos::with_clock(|| 1_709_213_862);
        assert_eq!(read(&mut c, REG_SECONDS), 0x42);
        assert_eq!(read(&mut c, REG_MINUTES), 0x37);
        assert_eq!(read(&mut c, REG_HOURS), 0x13);
        assert_eq!(read(&mut c, REG_DAY), 0x29);
        assert_eq!(read(&mut c, REG_MONTH), 0x02);
        assert_eq!(read(&mut c, REG_YEAR), 0x24);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_STATUS_A) & 0x80, 0, "update never in progress");
        assert_eq!(read(&mut c, REG_STATUS_D), STATUS_D);
    }

    #[test]
    fn state_round_trips() {
        let mut c = Cmos::with_clock(|| 0);
        c.write(0, &[0x40]);
        c.write(1, &[0x77]);
        let s = c.save();
        let mut r = Cmos::restore(&s);
        assert_eq!(r.save(), s);
        assert_eq!(read(&mut r, 0x40), 0x77);
        let short = CmosState { index: 0xff, ram: vec![1, 2, 3] };
        assert_eq!(Cmos::restore(&short).save(), CmosState { index: 0x7f, ram: vec![0; 128] });
    }

    #[test]
    fn ram_is_writable_but_the_clock_is_not() {
        let mut c = Cmos::with_clock(|| 0);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.write(0, &[REG_SECONDS]);
        c.write(1, &[0x59]);
        assert_eq!(read(&mut c, REG_SECONDS), 0);
    }
}
